//! One gRPC server of the sim (PD or a store) on a 127.0.0.1 port, and the reply helper
//! every handler uses.

use std::sync::{Arc, OnceLock};

use grpcio::{
    ChannelBuilder, Client, Environment, RpcStatus, Server, ServerBuilder, ServerCredentials, Service, UnarySink,
};

use crate::error::{Error, Result};

/// The sim's own completion queues, apart from the clients' (`security::grpc_env`), so that
/// a test or benchmark measures the client without sharing its threads with the fakes.
fn sim_env() -> Arc<Environment> {
    static ENV: OnceLock<Arc<Environment>> = OnceLock::new();
    ENV.get_or_init(|| Arc::new(grpcio::EnvBuilder::new().cq_count(2).name_prefix("sim-grpc").build())).clone()
}

pub struct RunningServer {
    server: Server,
    port: u16,
}

impl RunningServer {
    /// Serves `services` on `127.0.0.1:port` (0 picks a free port). `what` names the server
    /// in errors ("PD", "store 3").
    pub fn start(services: Vec<Service>, port: u16, what: &str) -> Result<RunningServer> {
        let fail = |reason: String| Error::InvalidAddress { address: format!("127.0.0.1:{port}"), reason };
        let builder = services.into_iter().fold(ServerBuilder::new(sim_env()), ServerBuilder::register_service);
        let mut server = builder.build().map_err(|e| fail(format!("cannot build the sim's {what} server: {e}")))?;
        let port = server
            .add_listening_port(format!("127.0.0.1:{port}"), ServerCredentials::insecure())
            .map_err(|e| fail(format!("cannot listen for the sim's {what}: {e}")))?;
        server.start();
        Ok(RunningServer { server, port })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Closes the port and cancels every call in flight, so clients see the process gone.
    pub fn stop(mut self) {
        let shutdown = self.server.shutdown();
        self.server.cancel_all_calls();
        if let Err(e) = futures_executor::block_on(shutdown) {
            log::warn!("sim server on port {} did not shut down cleanly: {e}", self.port);
        }
    }
}

/// Runs futures on the sim's completion-queue threads, as `RpcContext::spawn` does, for
/// replies sent after their handler returned (delayed or parked ones have no context left).
/// grpcio spawns through a `Client`; this one's channel never carries a call, so it never
/// connects anywhere.
fn spawner() -> &'static Client {
    static CLIENT: OnceLock<Client> = OnceLock::new();
    CLIENT.get_or_init(|| Client::new(ChannelBuilder::new(sim_env()).connect("127.0.0.1:1")))
}

/// Sends a unary reply and drives it to completion. Dropping the delivery future early
/// would release the call before the client's close arrives, which gRPC core turns into a
/// CANCELLED status for the client.
pub fn reply<T>(sink: UnarySink<T>, answer: std::result::Result<T, RpcStatus>) {
    let delivery = match answer {
        Ok(message) => sink.success(message),
        Err(status) => sink.fail(status),
    };
    spawner().spawn(async move {
        if let Err(e) = delivery.await {
            log::debug!("sim: a reply was not delivered: {e}");
        }
    });
}
