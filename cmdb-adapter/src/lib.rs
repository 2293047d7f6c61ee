//! Reads this VM's service identity from a CMDB.
