//! A small synchronous etcd v3 client on grpcio (KV, Txn, Watch, Lease, election), and a
//! launcher for a real etcd server used by the demo and the tests.

mod client;
mod election;
mod lease;
#[cfg(feature = "sim")]
pub(crate) mod process;
mod watch;

pub use client::{
    prefix_end, Cmp, EtcdClient, EtcdConfig, GetOptions, KeySpan, RangeResult, Txn, TxnOp, TxnResult,
    WATCH_SILENT_INTERVALS,
};
pub use election::{Candidate, Election, Leadership, TakeOver};
pub use lease::LeaseKeeper;
#[cfg(feature = "sim")]
pub use process::{EtcdProcess, ServerTls};
pub use watch::{EventKind, WatchBatch, WatchEvent, WatchOptions, Watcher};

pub use crate::proto::etcdserverpb::{
    Compare_CompareResult as CompareResult, RangeRequest_SortOrder as SortOrder, RangeRequest_SortTarget as SortTarget,
};
pub use crate::proto::mvccpb::KeyValue;

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use futures_util::{SinkExt, TryStreamExt};
    use grpcio::{DuplexSink, RequestStream, RpcContext, ServerBuilder, ServerCredentials, WriteFlags};
    use parking_lot::Mutex;

    use super::*;
    use crate::proto::etcdserverpb::{LeaseKeepAliveRequest, LeaseKeepAliveResponse, WatchRequest, WatchResponse};
    use crate::proto::etcdserverpb_grpc::{create_lease, create_watch, Lease, Watch};

    /// A stream asked for, and the value of its `hasleader` metadata.
    type Seen = (&'static str, Option<String>);

    /// A member that records the `hasleader` metadata of every stream it is asked for.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<Seen>>>);

    impl Recorder {
        fn record(&self, call: &'static str, ctx: &RpcContext) {
            let has_leader = ctx.request_headers().iter().find(|(key, _)| *key == "hasleader");
            self.0.lock().push((call, has_leader.map(|(_, value)| String::from_utf8_lossy(value).into_owned())));
        }
    }

    /// Answers each request with `answer` until the client goes.
    fn serve<Req: Send + 'static, Resp: Send + 'static>(
        ctx: &RpcContext,
        requests: RequestStream<Req>,
        mut sink: DuplexSink<Resp>,
        answer: fn() -> Resp,
    ) {
        let mut requests = requests;
        ctx.spawn(async move {
            while let Ok(Some(_)) = requests.try_next().await {
                if sink.send((answer(), WriteFlags::default())).await.is_err() {
                    return;
                }
            }
            let _ = sink.close().await;
        });
    }

    impl Watch for Recorder {
        fn watch(&mut self, ctx: RpcContext, requests: RequestStream<WatchRequest>, sink: DuplexSink<WatchResponse>) {
            self.record("Watch", &ctx);
            serve(&ctx, requests, sink, || {
                let mut created = WatchResponse::new();
                created.set_created(true);
                created
            });
        }
    }

    impl Lease for Recorder {
        fn lease_keep_alive(
            &mut self,
            ctx: RpcContext,
            requests: RequestStream<LeaseKeepAliveRequest>,
            sink: DuplexSink<LeaseKeepAliveResponse>,
        ) {
            self.record("LeaseKeepAlive", &ctx);
            serve(&ctx, requests, sink, || {
                let mut renewed = LeaseKeepAliveResponse::new();
                renewed.set_TTL(10);
                renewed
            });
        }
    }

    #[test]
    fn watch_and_keep_alive_streams_require_a_leader() {
        let recorder = Recorder::default();
        let env = Arc::new(grpcio::EnvBuilder::new().cq_count(1).name_prefix("test-etcd").build());
        let services = ServerBuilder::new(env)
            .register_service(create_watch(recorder.clone()))
            .register_service(create_lease(recorder.clone()));
        let mut server = services.build().unwrap();
        let port = server.add_listening_port("127.0.0.1:0", ServerCredentials::insecure()).unwrap();
        server.start();
        let client = EtcdClient::connect_plain([format!("127.0.0.1:{port}")]).unwrap();
        let _watcher = client.watch(KeySpan::key("k"), WatchOptions::default()).unwrap();
        let _keeper = client.keep_alive(7, Duration::from_secs(30)).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while recorder.0.lock().len() < 2 {
            assert!(std::time::Instant::now() < deadline, "streams seen: {:?}", recorder.0.lock());
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut seen = recorder.0.lock().clone();
        seen.sort();
        let required = Some("true".to_string());
        assert_eq!(seen, [("LeaseKeepAlive", required.clone()), ("Watch", required)]);
    }
}
