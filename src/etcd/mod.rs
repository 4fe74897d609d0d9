//! A small synchronous etcd v3 client on grpcio (KV, Txn, Watch, Lease, election), and a
//! launcher for a real etcd server used by the demo and the tests.

pub mod process;

pub use process::EtcdProcess;
