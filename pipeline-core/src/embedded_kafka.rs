//! The embedded Kafka: librdkafka's mock cluster hosted on a dedicated thread.
//!
//! The mock cluster speaks the real Kafka protocol on 127.0.0.1 sockets, so producers, consumers
//! and kcat in this or other processes use it like a broker. `MockCluster` is `!Send`, hence the
//! owning thread and the command channel. The mock cannot create topics through the CreateTopics
//! API, so the hosting process creates them here.
//!
//! The mock listens on random ports; [`EmbeddedKafka::start`] can also forward a fixed port
//! (e.g. 9092) to it. Clients bootstrap through that port and then follow the metadata to the
//! mock's own listener, which works for every client on the same host.

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use anyhow::{anyhow, Context};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::topics::TopicSpec;

/// Fault injection and control commands executed on the cluster's thread.
#[derive(Debug, Clone)]
pub enum BrokerCommand {
    /// Take a broker (1-based id, -1 for all) down.
    BrokerDown(i32),
    /// Bring a broker back.
    BrokerUp(i32),
    /// Create a topic with the given partition count.
    CreateTopic(String, i32),
    /// Fail the next requests of an API with these errors, one per request.
    RequestErrors(RDKafkaApiKey, Vec<RDKafkaRespErr>),
}

/// The Kafka error codes fault tests inject, by name.
pub fn error_code(name: &str) -> Option<RDKafkaRespErr> {
    use RDKafkaRespErr::*;
    Some(match name {
        "REQUEST_TIMED_OUT" => RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
        "NOT_ENOUGH_REPLICAS" => RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
        "NOT_LEADER_FOR_PARTITION" => RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
        "NOT_COORDINATOR" => RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
        "COORDINATOR_NOT_AVAILABLE" => RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
        "TOPIC_AUTHORIZATION_FAILED" => RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
        "MSG_SIZE_TOO_LARGE" => RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE,
        _ => return None,
    })
}

/// The Kafka APIs fault tests target, by name.
pub fn api_key(name: &str) -> Option<RDKafkaApiKey> {
    Some(match name {
        "produce" => RDKafkaApiKey::Produce,
        "fetch" => RDKafkaApiKey::Fetch,
        "offset_commit" => RDKafkaApiKey::OffsetCommit,
        "offset_fetch" => RDKafkaApiKey::OffsetFetch,
        "heartbeat" => RDKafkaApiKey::Heartbeat,
        _ => return None,
    })
}

type Command = (BrokerCommand, mpsc::Sender<Result<(), String>>);

/// A running embedded broker. Dropping it stops the cluster.
pub struct EmbeddedKafka {
    bootstrap: String,
    commands: mpsc::Sender<Command>,
    thread: Option<thread::JoinHandle<()>>,
    proxy_stop: CancellationToken,
}

impl EmbeddedKafka {
    /// Starts a one-broker mock cluster and creates `topics` with their partition counts (the
    /// mock does not compact: `compacted` is not applied).
    pub fn start(topics: &[TopicSpec]) -> anyhow::Result<Self> {
        let (ready_tx, ready_rx) = mpsc::channel::<Result<String, String>>();
        let (cmd_tx, cmd_rx) = mpsc::channel::<Command>();
        let topics: Vec<(String, i32)> = topics
            .iter()
            .map(|t| (t.name.clone(), t.partitions))
            .collect();
        let thread = thread::Builder::new()
            .name("embedded-kafka".into())
            .spawn(move || {
                let cluster = match MockCluster::new(1) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("starting the mock cluster: {e}")));
                        return;
                    }
                };
                for (t, partitions) in &topics {
                    if let Err(e) = cluster.create_topic(t, *partitions, 1) {
                        let _ = ready_tx.send(Err(format!("creating topic {t}: {e}")));
                        return;
                    }
                }
                let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
                // Serve commands until every sender is gone.
                while let Ok((cmd, reply)) = cmd_rx.recv() {
                    let result = match cmd {
                        BrokerCommand::BrokerDown(id) => cluster.broker_down(id),
                        BrokerCommand::BrokerUp(id) => cluster.broker_up(id),
                        BrokerCommand::CreateTopic(t, n) => cluster.create_topic(&t, n, 1),
                        BrokerCommand::RequestErrors(api, errs) => {
                            cluster.request_errors(api, &errs);
                            Ok(())
                        }
                    };
                    let _ = reply.send(result.map_err(|e| e.to_string()));
                }
            })
            .context("spawning the embedded Kafka thread")?;
        let bootstrap = ready_rx
            .recv_timeout(Duration::from_secs(30))
            .context("embedded Kafka did not start")?
            .map_err(|e| anyhow!(e))?;
        Ok(Self {
            bootstrap,
            commands: cmd_tx,
            thread: Some(thread),
            proxy_stop: CancellationToken::new(),
        })
    }

    /// The `bootstrap.servers` of the mock listener.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    /// Runs a control command on the cluster.
    pub fn command(&self, cmd: BrokerCommand) -> anyhow::Result<()> {
        let (tx, rx) = mpsc::channel();
        self.commands
            .send((cmd.clone(), tx))
            .map_err(|_| anyhow!("embedded Kafka has stopped"))?;
        rx.recv_timeout(Duration::from_secs(10))
            .context("embedded Kafka did not answer")?
            .map_err(|e| anyhow!("{cmd:?}: {e}"))
    }

    /// Forwards TCP connections on `listener` to the mock broker (a fixed bootstrap port).
    pub fn forward(&self, listener: TcpListener) -> anyhow::Result<()> {
        let target = self
            .bootstrap
            .split(',')
            .next()
            .ok_or_else(|| anyhow!("mock cluster has no listener"))?
            .to_owned();
        let stop = self.proxy_stop.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((mut inbound, _)) = accepted else {
                    continue;
                };
                let target = target.clone();
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Ok(())
    }
}

impl Drop for EmbeddedKafka {
    fn drop(&mut self) {
        self.proxy_stop.cancel();
        // Closing the command channel ends the thread, which drops (stops) the cluster.
        let (tx, _) = mpsc::channel();
        self.commands = tx;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
