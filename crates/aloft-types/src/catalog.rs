//! Catalog records (values stored under the `Store` keys of DESIGN §4): apps, machines
//! as published by their agent, hosts, certificates. JSON with a schema version.
