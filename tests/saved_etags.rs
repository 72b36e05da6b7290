//! Page ETags kept across polls and saved across producer restarts, against a source whose
//! ETags are content hashes (the same content always gets the same ETag, as many real APIs
//! do). The danger with such a source: a page that changes A → B → A answers 304 to the ETag of
//! A, so if B was published but the ETag of A is still what the producer remembers (B's poll
//! failed, or the producer died before saving), the revert to A would never be published.
//! Also: a save reported failed may have landed, and is deleted like one that succeeded; a save
//! in fewer chunks deletes the chunk keys of earlier saves it did not overwrite; records such a
//! source serves invalid are dead-lettered by the producer, and a DLQ that refuses them holds
//! the poll (and so its ETags) until it accepts them.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use common::set_topic_config;
use pipeline_core::canonical::sha256_hex;
use pipeline_core::pipeline_config::{
    IncrementalConfig, JoinConfig, JoinSide, Pagination, PipelineConfig, RetryConfig, SourceConfig,
};
use pipeline_core::topics::partition_counts;
use pipeline_kit::stack::{Stack, StackConfig};
use serde_json::{json, Value};

/// Two records a page; a page whose number is `failing` answers 500.
#[derive(Default)]
struct Api {
    pages: Vec<Vec<Value>>,
    failing: Option<usize>,
}

#[derive(serde::Deserialize)]
struct PageQuery {
    page: usize,
}

async fn page(
    State(api): State<Arc<Mutex<Api>>>,
    Query(q): Query<PageQuery>,
    headers: HeaderMap,
) -> Response {
    let api = api.lock().unwrap();
    if api.failing == Some(q.page) {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let records = api.pages.get(q.page - 1).cloned().unwrap_or_default();
    let etag = format!(
        "\"{}\"",
        sha256_hex(Value::from(records.clone()).to_string().as_bytes())
    );
    if headers.get("if-none-match").and_then(|v| v.to_str().ok()) == Some(etag.as_str()) {
        return (StatusCode::NOT_MODIFIED, [("etag", etag)]).into_response();
    }
    let next = (q.page < api.pages.len()).then_some(q.page + 1);
    (
        [("etag", etag)],
        Json(json!({"data": records, "next_page": next})),
    )
        .into_response()
}

fn record(id: u64, name: &str, updated_at: &str) -> Value {
    json!({"id": id, "name": name, "updated_at": updated_at})
}

fn source(name: &str, base_url: &str) -> SourceConfig {
    SourceConfig {
        name: name.into(),
        base_url: base_url.into(),
        path: format!("/{name}"),
        entity: name.into(),
        schema: None,
        topic: format!("{name}_data"),
        partitions: 2,
        id_field: "id".into(),
        updated_at_field: "updated_at".into(),
        records_field: None,
        interval_s: 1,
        timeout_ms: 2_000,
        rate_limit_per_s: None,
        pagination: Pagination::Page {
            page_param: "page".into(),
            size_param: "per_page".into(),
            size: 2,
        },
        auth: None,
        retry: RetryConfig {
            max_attempts: 1,
            initial_backoff_ms: 10,
            max_backoff_ms: 10,
        },
        incremental: IncrementalConfig::default(),
        mock: None,
    }
}

struct Fixture {
    api: Arc<Mutex<Api>>,
    stack: Stack,
}

impl Fixture {
    async fn start() -> Self {
        let a = vec![
            vec![
                record(1, "A", "2026-01-01T00:00:00Z"),
                record(2, "two", "2026-01-01T00:00:00Z"),
            ],
            vec![record(3, "three", "2026-01-01T00:00:00Z")],
        ];
        let b = vec![vec![record(1, "b", "2026-01-01T00:00:00Z")]];
        let api_a = Arc::new(Mutex::new(Api {
            pages: a,
            failing: None,
        }));
        let api_b = Arc::new(Mutex::new(Api {
            pages: b,
            failing: None,
        }));
        let app = Router::new()
            .route("/a", get(page).with_state(api_a.clone()))
            .route("/b", get(page).with_state(api_b));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let pipeline = PipelineConfig {
            origin: "saved-etags".into(),
            join: JoinConfig {
                sides: ["a", "b"]
                    .iter()
                    .map(|n| JoinSide {
                        name: (*n).into(),
                        topic: format!("{n}_data"),
                        required: true,
                    })
                    .collect(),
            },
            sources: vec![source("a", &url), source("b", &url)],
        };
        let stack = Stack::start(StackConfig {
            consumers: 0,
            partitions: 2,
            pipeline: Some(pipeline),
            ..StackConfig::default()
        })
        .await
        .unwrap();
        Self { api: api_a, stack }
    }

    fn set_first_record(&self, name: &str) {
        self.api.lock().unwrap().pages[0][0] = record(1, name, "2026-01-01T00:00:00Z");
    }

    /// One record a page, named `names[i]` on page `i + 1`.
    fn set_pages(&self, names: &[&str]) {
        self.api.lock().unwrap().pages = (1..)
            .zip(names)
            .map(|(id, name)| vec![record(id, name, "2026-01-01T00:00:00Z")])
            .collect();
    }

    fn fail_page(&self, page: Option<usize>) {
        self.api.lock().unwrap().failing = page;
    }

    /// A → B on page 1 and page 2 failing: `p`'s poll publishes B, then fails.
    async fn change_and_fail_poll(&self, p: &producer::Producer) {
        self.set_first_record("B");
        self.fail_page(Some(2));
        let err = poll_a(p).await.unwrap_err();
        assert!(format!("{err:#}").contains("500"), "{err:#}");
    }

    /// B → A, page 2 healed: page 1 is byte for byte what it was, with the same ETag as then.
    fn revert(&self) {
        self.set_first_record("A");
        self.fail_page(None);
    }

    async fn producer(&self) -> producer::Producer {
        producer::Producer::new(&self.stack.producer_config())
            .await
            .unwrap()
    }
}

/// Polls source `a` once; its report.
async fn poll_a(p: &producer::Producer) -> anyhow::Result<producer::SourceReport> {
    p.poll_source(0).await
}

/// The poll read both pages in full and published all three records: it sent no ETag of A.
fn assert_all_published(report: &producer::SourceReport) {
    assert_eq!(
        (report.published, report.pages_not_modified),
        (3, 0),
        "{report:?}"
    );
}

/// The poll published nothing: each of its `pages` answered 304 to a saved ETag.
fn assert_all_not_modified(report: &producer::SourceReport, pages: u64) {
    assert_eq!(
        (report.published, report.pages_not_modified),
        (0, pages),
        "{report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revert_after_a_failed_poll_is_published_by_the_same_and_by_a_new_producer() {
    common::init_logs();
    let f = Fixture::start().await;
    let first = f.producer().await;
    assert_eq!(poll_a(&first).await.unwrap().published, 3);
    // A new producer sends the saved ETags: nothing is re-published.
    let restarted = f.producer().await;
    let again = poll_a(&restarted).await.unwrap();
    assert_all_not_modified(&again, 2);

    // A → B is published from page 1, then page 2 fails: the poll fails.
    f.change_and_fail_poll(&restarted).await;
    f.revert();
    // The same producer no longer sends page 1's ETag: the revert is published. Page 2's ETag
    // still names what was last published for it (the failed poll published nothing of it):
    // it answers 304 and is not read again.
    let same = poll_a(&restarted).await.unwrap();
    assert_eq!(
        (same.published, same.pages_not_modified),
        (2, 1),
        "{same:?}"
    );

    // Once more, with a producer that dies after the failed poll: a new one must not find the
    // ETag of A in the source-state topic either.
    let dying = f.producer().await;
    assert_eq!(poll_a(&dying).await.unwrap().published, 0);
    f.change_and_fail_poll(&dying).await;
    drop(dying);
    f.revert();
    assert_all_published(&poll_a(&f.producer().await).await.unwrap());
    // That poll completed and saved its ETags: the one after it is all 304s again.
    let settled = poll_a(&f.producer().await).await.unwrap();
    assert_all_not_modified(&settled, 2);
    f.stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_reported_failed_that_landed_is_still_deleted_before_changes_are_published() {
    common::init_logs();
    let f = Fixture::start().await;
    // The save of the first poll's ETags lands, but its acknowledgement is lost: the producer
    // sees a failed save, while the topic holds the manifest of A's pages.
    let dying = f.producer().await;
    dying.lose_next_save_ack();
    assert_eq!(poll_a(&dying).await.unwrap().published, 3);
    // A → B is published from page 1, then page 2 fails, and the producer dies. The manifest
    // that landed must have been deleted before B was published.
    f.change_and_fail_poll(&dying).await;
    drop(dying);
    // B → A: a new producer must not find A's ETags, or page 1 would answer 304 and the revert
    // would never be published.
    f.revert();
    assert_all_published(&poll_a(&f.producer().await).await.unwrap());
    f.stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_a_failed_poll_published_is_read_again_and_only_those() {
    common::init_logs();
    let f = Fixture::start().await;
    f.set_pages(&["A", "A", "A"]);
    let p = f.producer().await;
    assert_eq!(poll_a(&p).await.unwrap().published, 3);
    // Pages 1 and 2 change and are published, then page 3 fails.
    f.set_pages(&["B", "B", "A"]);
    f.fail_page(Some(3));
    assert!(poll_a(&p).await.is_err());
    // Both revert: neither may answer 304 to the ETag of A, while page 3 still may.
    f.set_pages(&["A", "A", "A"]);
    f.fail_page(None);
    let next = poll_a(&p).await.unwrap();
    assert_eq!(
        (next.published, next.pages_not_modified),
        (2, 1),
        "{next:?}"
    );
    f.stack.stop().await;
}

/// Chunk numbers of source `a`'s saved pages that hold a value in the source-state topic.
async fn saved_chunks_of_a(f: &Fixture) -> Vec<usize> {
    let config = f.stack.producer_config();
    let saved = producer::state::load(&config.kafka, &config.topics.state_topic)
        .await
        .unwrap();
    saved
        .chunk_keys
        .get("a")
        .map(|keys| keys.iter().copied().collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_in_fewer_chunks_deletes_the_chunks_it_does_not_overwrite() {
    common::init_logs();
    let f = Fixture::start().await;
    // The embedded broker creates the source-state topic as `TopicsConfig::plan` does on a real
    // cluster: one partition (the data topics here have two).
    let config = f.stack.producer_config();
    let state_topic = config.topics.state_topic.clone();
    let counts = partition_counts(&config.kafka, &[&state_topic])
        .await
        .unwrap();
    assert_eq!(counts, [(state_topic, 1)]);
    // 2,000 pages of one record: their URLs and ETags take two chunks of at most 256 KiB.
    let many: Vec<Vec<Value>> = (1..=2000)
        .map(|i| vec![record(i, "many", "2026-01-01T00:00:00Z")])
        .collect();
    f.api.lock().unwrap().pages = many;
    let p = f.producer().await;
    assert_eq!(poll_a(&p).await.unwrap().published, 2000);
    assert_eq!(saved_chunks_of_a(&f).await, [0, 1]);

    // The source shrinks to one page: its save takes one chunk, and chunk 1 is deleted.
    f.api.lock().unwrap().pages = vec![vec![record(1, "few", "2026-01-01T00:00:00Z")]];
    let shrunk = poll_a(&p).await.unwrap();
    assert_eq!(shrunk.published, 1, "{shrunk:?}");
    assert_eq!(saved_chunks_of_a(&f).await, [0]);

    // A new producer still finds the one page's ETag: all 304s.
    let next = poll_a(&f.producer().await).await.unwrap();
    assert_all_not_modified(&next, 1);

    f.stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_source_records_are_dead_lettered_and_a_refusing_dlq_holds_the_poll() {
    common::init_logs();
    let f = Fixture::start().await;
    let bs = f.stack.bootstrap_servers().to_owned();
    f.api.lock().unwrap().pages = vec![vec![
        record(1, "fine", "2026-01-01T00:00:00Z"),
        json!({"name": "no id", "updated_at": "2026-01-01T00:00:00Z"}),
        json!({"id": {"nested": 1}, "name": "object id"}),
    ]];
    // The DLQ refuses every record: the poll keeps retrying its dead letters and saves nothing.
    set_topic_config(&bs, "analytics_DLQ", &[("max.message.bytes", "64")]).await;
    let failures = r#"pipeline_dlq_write_failures_total{component="producer"}"#;
    let before = common::metric(failures);
    let p = f.producer().await;
    let poll = tokio::spawn({
        let p = p.clone();
        async move { poll_a(&p).await }
    });
    common::wait_for("the producer's DLQ write refused", || async {
        common::metric(failures) > before
    })
    .await;
    assert!(!poll.is_finished(), "the poll waits for its dead letters");
    set_topic_config(&bs, "analytics_DLQ", &[("max.message.bytes", "1048588")]).await;
    let report = tokio::time::timeout(std::time::Duration::from_secs(60), poll)
        .await
        .expect("the poll completes once the DLQ accepts")
        .unwrap()
        .unwrap();
    assert_eq!((report.published, report.invalid), (1, 2), "{report:?}");

    let dlq = common::read_topic(&bs, "analytics_DLQ", 2);
    let mut seen: Vec<(String, String, String, String)> = dlq
        .iter()
        .map(|m| {
            let h = |k| common::header(m, k).unwrap_or_default();
            (
                h("dlq.stage"),
                h("dlq.error.class"),
                h("dlq.original.topic"),
                h("source"),
            )
        })
        .collect();
    seen.sort();
    let want = |class: &str| {
        (
            "validate".to_owned(),
            class.to_owned(),
            "a_data".to_owned(),
            "a".to_owned(),
        )
    };
    assert_eq!(seen, [want("invalid_id"), want("missing_id")]);
    // The poll completed, so its ETags were saved: a new producer re-publishes nothing.
    assert_all_not_modified(&poll_a(&f.producer().await).await.unwrap(), 1);
    f.stack.stop().await;
}
