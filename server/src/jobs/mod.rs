//! Background work. Today: garbage collection. Durable import/export/copy jobs arrive with the
//! formats and replication work.

pub mod gc;
