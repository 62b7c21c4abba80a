//! User and group resolution through the image's `/etc/passwd` and `/etc/group`.

/// Who the app runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: String,
}

/// Why a user spec cannot be resolved.
#[derive(Debug, PartialEq, Eq)]
pub enum UserError {
    UnknownUser(String),
    UnknownGroup(String),
}

impl std::fmt::Display for UserError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UserError::UnknownUser(u) => write!(f, "user {u:?} not found in /etc/passwd"),
            UserError::UnknownGroup(g) => write!(f, "group {g:?} not found in /etc/group"),
        }
    }
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

fn passwd_entries(passwd: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    passwd.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 || line.starts_with('#') {
            return None;
        }
        Some(PasswdEntry {
            name: f[0],
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5],
        })
    })
}

/// (name, gid, members)
fn group_entries(group: &str) -> impl Iterator<Item = (&str, u32, Vec<&str>)> {
    group.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 4 || line.starts_with('#') {
            return None;
        }
        let members = f[3].split(',').filter(|m| !m.is_empty()).collect();
        Some((f[0], f[2].parse().ok()?, members))
    })
}

/// Resolves an OCI `user` (`""`, `name`, `uid`, `name:group`, `uid:gid` …) against the
/// texts of `/etc/passwd` and `/etc/group` (empty when the image has none).
pub fn resolve(spec: &str, passwd: &str, group: &str) -> Result<Credentials, UserError> {
    let spec = spec.trim();
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user = if user.is_empty() { "root" } else { user };
    let entry = passwd_entries(passwd).find(|e| e.name == user || e.uid.to_string() == user);
    let (uid, mut gid, name, home) = match (entry, user.parse::<u32>()) {
        (Some(e), _) => (e.uid, e.gid, Some(e.name.to_string()), e.home.to_string()),
        (None, Ok(uid)) => (uid, 0, None, "/".to_string()),
        (None, Err(_)) if user == "root" => (0, 0, Some("root".into()), "/root".into()),
        (None, Err(_)) => return Err(UserError::UnknownUser(user.to_string())),
    };
    let home = if home.is_empty() {
        "/".to_string()
    } else {
        home
    };
    let mut groups = Vec::new();
    if let Some(g) = grp.filter(|g| !g.is_empty()) {
        gid = match group_entries(group).find(|(n, _, _)| *n == g) {
            Some((_, id, _)) => id,
            None => g
                .parse()
                .map_err(|_| UserError::UnknownGroup(g.to_string()))?,
        };
    } else if let Some(name) = &name {
        groups = group_entries(group)
            .filter(|(_, id, members)| *id != gid && members.contains(&name.as_str()))
            .map(|(_, id, _)| id)
            .collect();
    }
    groups.insert(0, gid);
    Ok(Credentials {
        uid,
        gid,
        groups,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        # comment\n\
        app:x:1000:1000:App:/home/app:/bin/sh\n\
        broken:x:notanumber:1:::\n";
    const GROUP: &str = "root:x:0:\napp:x:1000:\nwheel:x:10:app,other\nstaff:x:50:other\n";

    #[test]
    fn names_and_numbers() {
        let root = resolve("", PASSWD, GROUP).unwrap();
        assert_eq!((root.uid, root.gid, root.home.as_str()), (0, 0, "/root"));
        let app = resolve("app", PASSWD, GROUP).unwrap();
        assert_eq!(app.uid, 1000);
        assert_eq!(app.gid, 1000);
        assert_eq!(app.groups, vec![1000, 10]);
        assert_eq!(app.home, "/home/app");
        assert_eq!(resolve("1000", PASSWD, GROUP).unwrap(), app);
        let g = resolve("app:staff", PASSWD, GROUP).unwrap();
        assert_eq!((g.uid, g.gid, g.groups.clone()), (1000, 50, vec![50]));
        let n = resolve("4242:4343", PASSWD, GROUP).unwrap();
        assert_eq!((n.uid, n.gid, n.home.as_str()), (4242, 4343, "/"));
        let d = resolve("daemon", PASSWD, GROUP).unwrap();
        assert_eq!((d.uid, d.gid), (1, 1));
    }

    #[test]
    fn unknown_names_are_errors_and_no_passwd_still_allows_root() {
        assert_eq!(
            resolve("nobody", PASSWD, GROUP),
            Err(UserError::UnknownUser("nobody".into()))
        );
        assert_eq!(
            resolve("app:nogroup", PASSWD, GROUP),
            Err(UserError::UnknownGroup("nogroup".into()))
        );
        assert_eq!(resolve("root", "", "").unwrap().uid, 0);
        assert_eq!(resolve("", "", "").unwrap().home, "/root");
        assert_eq!(
            resolve("broken", PASSWD, GROUP),
            Err(UserError::UnknownUser("broken".into()))
        );
    }
}
