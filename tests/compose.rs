//! The `topics` service of `docker-compose.yml`, run for real: its shell commands with Apache
//! Kafka's own `kafka-topics` against the Kafka version compose runs, and the topics it makes are
//! the ones the pipeline plans (partitions, compaction).

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::collections::HashMap;

use pipeline_kit::apache_kafka::{kafka_home, ApacheKafka, BrokerOptions};
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

/// The `command` script of the compose service `service`, as compose hands it to `sh -c`.
fn compose_command(service: &str) -> String {
    let compose = std::fs::read_to_string("docker-compose.yml").unwrap();
    let mut lines = compose.lines();
    lines
        .find(|l| *l == format!("  {service}:"))
        .unwrap_or_else(|| panic!("no service {service} in docker-compose.yml"));
    lines
        .find(|l| l.trim() == "- |")
        .expect("the service's command is a block");
    let script: Vec<&str> = lines
        .take_while(|l| l.starts_with("        ") || l.trim().is_empty())
        .map(|l| l.strip_prefix("        ").unwrap_or(""))
        .collect();
    // Compose reads `$$` as a literal `$`.
    script.join("\n").replace("$$", "$")
}

/// Runs the compose `topics` script against `bootstrap`, `kafka-topics.sh` being the fetched
/// jars' TopicCommand.
fn run_topics_service(bootstrap: &str, dir: &std::path::Path) {
    let shim = dir.join("kafka-topics.sh");
    std::fs::write(
        &shim,
        format!(
            "#!/bin/sh\nexec java -cp '{}/lib/*' org.apache.kafka.tools.TopicCommand \"$@\"\n",
            kafka_home().unwrap().display()
        ),
    )
    .unwrap();
    let status = std::process::Command::new("chmod")
        .args(["+x", shim.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    let script = compose_command("topics")
        .replace("/opt/kafka/bin/kafka-topics.sh", shim.to_str().unwrap())
        .replace("kafka:9092", bootstrap);
    let out = std::process::Command::new("sh")
        .args(["-ec", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the topics service failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_topics_service_creates_the_topics_the_pipeline_plans() {
    let kafka = tokio::task::spawn_blocking(|| ApacheKafka::start(&BrokerOptions::default()))
        .await
        .unwrap()
        .unwrap();
    let bootstrap = kafka.bootstrap();
    let dir = tempfile::tempdir().unwrap();
    run_topics_service(&bootstrap, dir.path());
    // `--if-not-exists`: a second `docker compose up` runs it again.
    run_topics_service(&bootstrap, dir.path());

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    let md = consumer
        .fetch_metadata(None, std::time::Duration::from_secs(10))
        .unwrap();
    let partitions: HashMap<String, usize> = md
        .topics()
        .iter()
        .map(|t| (t.name().to_owned(), t.partitions().len()))
        .collect();
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    let topics = pipeline_core::topics::TopicsConfig::default();
    let plan = pipeline_core::pipeline_config::PipelineConfig::two_sources(
        &pipeline_core::pipeline_config::TwoSources::topics_only(&topics),
    )
    .topic_plan(&topics);
    for spec in &plan.topics {
        assert_eq!(
            partitions.get(&spec.name).copied(),
            Some(spec.partitions as usize),
            "{}: partitions as planned",
            spec.name
        );
        let configs = admin
            .describe_configs(
                &[ResourceSpecifier::Topic(&spec.name)],
                &AdminOptions::new(),
            )
            .await
            .unwrap();
        let config = configs.into_iter().next().unwrap().unwrap();
        let policy = config.get("cleanup.policy").and_then(|e| e.value.clone());
        let expected = if spec.compacted { "compact" } else { "delete" };
        assert_eq!(policy.as_deref(), Some(expected), "{}", spec.name);
    }
    // And the producer's own start-up check accepts them as they are.
    pipeline_core::topics::ensure_topics(
        &pipeline_core::kafka::KafkaConfig::new(&bootstrap),
        &plan,
    )
    .await
    .unwrap();
}

/// What `docker build` would need and cannot be run here: every path the Dockerfile copies
/// exists, and every workspace member's manifest is copied into the dependency layer (a missing
/// one fails the build; a removed one, like the old `vendor/`, too).
#[test]
fn the_dockerfile_copies_what_the_workspace_has() {
    let dockerfile = std::fs::read_to_string("Dockerfile").unwrap();
    let copied: Vec<&str> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("COPY "))
        .filter(|l| !l.starts_with("--from"))
        .flat_map(|l| {
            let parts: Vec<&str> = l.split_whitespace().collect();
            parts[..parts.len() - 1].to_vec()
        })
        .collect();
    for path in &copied {
        if *path != "." {
            assert!(
                std::path::Path::new(path).exists(),
                "the Dockerfile copies {path}, which the repository does not have"
            );
        }
    }
    let manifest = std::fs::read_to_string("Cargo.toml").unwrap();
    let members = manifest
        .lines()
        .find_map(|l| l.strip_prefix("members = "))
        .expect("a members list in Cargo.toml");
    for member in members
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .map(|m| m.trim().trim_matches('"'))
    {
        assert!(
            copied.contains(&format!("{member}/Cargo.toml").as_str()),
            "the Dockerfile's dependency layer does not copy {member}/Cargo.toml"
        );
        assert!(
            dockerfile.contains(&format!(" {member} "))
                || dockerfile.contains(&format!(" {member};")),
            "the Dockerfile's stub loop does not stub {member}"
        );
    }
}
