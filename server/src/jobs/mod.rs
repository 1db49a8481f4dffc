//! Background work: garbage collection, and durable jobs (imports from a source URL today;
//! exports, copies and replication will join them).

pub mod arriving;
pub mod gc;
pub mod import;
