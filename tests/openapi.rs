//! The mocks' API descriptions: every mock serves an OpenAPI 3 spec at `/openapi.json` that a
//! validator from the registries accepts (`openapi-spec-validator`, installed by the test
//! command), every route it documents answers with a status it documents (malformed requests
//! with the documented JSON error body), and a real headless Chromium renders the operations in
//! Swagger UI at `/docs`.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::process::Command;

use mocks::analytics::{AnalyticsMock, AnalyticsMockConfig};
use mocks::faults::FaultConfig;
use mocks::sources::{Entity, SourceMock, SourceMockConfig};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// The Analytics mock and a CRM, each on port 0: (name, base URL).
async fn start_mocks(shutdown: &CancellationToken) -> Vec<(&'static str, String)> {
    let analytics = AnalyticsMock::new(&AnalyticsMockConfig::default()).router();
    let crm = SourceMock::new(
        Entity::Customers,
        &SourceMockConfig {
            records: 30,
            faults: FaultConfig::default(),
        },
    )
    .router();
    let mut out = Vec::new();
    for (name, router) in [("analytics", analytics), ("crm", crm)] {
        let addr = mocks::spawn(([127, 0, 0, 1], 0).into(), router, shutdown.clone())
            .await
            .unwrap();
        out.push((name, format!("http://{addr}")));
    }
    out
}

async fn spec_of(base: &str) -> Value {
    reqwest::get(format!("{base}/openapi.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The names of an operation's parameters, in order.
fn param_names(op: &Value) -> Vec<&str> {
    op["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect()
}

/// The validator the test command installed, or the one on `PATH`.
fn validator() -> String {
    std::env::var("OPENAPI_SPEC_VALIDATOR").unwrap_or_else(|_| "openapi-spec-validator".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mock_serves_an_openapi_3_spec_that_validates() {
    let shutdown = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    for (name, base) in start_mocks(&shutdown).await {
        let spec = spec_of(&base).await;
        assert!(
            spec["openapi"].as_str().unwrap().starts_with("3."),
            "{name}"
        );
        let file = dir.path().join(format!("{name}.json"));
        std::fs::write(&file, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
        let out = Command::new(validator())
            .arg(&file)
            .output()
            .expect("openapi-spec-validator is installed (the test command installs it)");
        let said = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {said}");
        assert!(said.contains("OK"), "{name}: {said}");
    }
    // The validator refuses a broken spec: the check above can fail.
    let broken = dir.path().join("broken.json");
    std::fs::write(&broken, r#"{"openapi": "3.1.0", "paths": {}}"#).unwrap();
    assert!(!Command::new(validator())
        .arg(&broken)
        .output()
        .unwrap()
        .status
        .success());
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_specs_document_the_contract_the_pipeline_integrates_with() {
    let shutdown = CancellationToken::new();
    let mocks = start_mocks(&shutdown).await;
    let analytics = spec_of(&mocks[0].1).await;
    let ingest = &analytics["paths"]["/analytics/data"]["post"];
    let params = param_names(ingest);
    assert_eq!(params, ["Idempotency-Key"]);
    for status in ["202", "400", "401", "422", "503"] {
        assert!(
            ingest["responses"][status].is_object(),
            "POST /analytics/data {status}"
        );
    }
    let schemas = &analytics["components"]["schemas"];
    assert!(schemas["Ingested"]["properties"]["rejected"].is_object());
    assert!(schemas["Rejection"]["properties"]["reason"].is_object());
    assert!(schemas["ErrorBody"]["properties"]["error"].is_object());
    assert!(analytics["components"]["securitySchemes"]["bearer"].is_object());
    for method in ["get", "put"] {
        assert!(analytics["paths"]["/admin/faults"][method].is_object());
    }
    assert!(schemas["FaultConfig"]["properties"]["error_rate"].is_object());

    let crm = spec_of(&mocks[1].1).await;
    let list = &crm["paths"]["/customers"]["get"];
    let names = param_names(list);
    for name in [
        "page",
        "per_page",
        "offset",
        "limit",
        "cursor",
        "updated_since",
        "If-None-Match",
    ] {
        assert!(
            names.contains(&name),
            "GET /customers documents {name}: {names:?}"
        );
    }
    assert!(list["responses"]["304"].is_object());
    assert!(list["responses"]["200"]["headers"]["ETag"].is_object());
    assert!(list["responses"]["200"]["headers"]["Link"].is_object());
    assert!(crm["paths"]["/customers"]["post"].is_object());
    shutdown.cancel();
}

/// One request per documented operation: (method, path, body).
fn documented_requests(spec: &Value) -> Vec<(String, String, Option<Value>)> {
    let mut out = Vec::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let body = op["requestBody"]["content"]["application/json"]["example"].clone();
            let body = if op["requestBody"].is_object() {
                Some(if body.is_null() {
                    serde_json::json!({})
                } else {
                    body
                })
            } else {
                None
            };
            out.push((method.clone(), path.clone(), body));
        }
    }
    out
}

fn documented_statuses(spec: &Value, method: &str, path: &str) -> Vec<String> {
    spec["paths"][path][method]["responses"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_route_answers_as_documented_and_errors_are_json() {
    let shutdown = CancellationToken::new();
    let client = reqwest::Client::new();
    for (name, base) in start_mocks(&shutdown).await {
        let spec = spec_of(&base).await;
        let requests = documented_requests(&spec);
        assert!(requests.len() >= 5, "{name}: {requests:?}");
        for (method, path, body) in requests {
            let url = format!("{base}{path}");
            let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let mut req = client.request(m.clone(), &url);
            if let Some(body) = &body {
                req = req.json(body);
            }
            let status = req.send().await.unwrap().status().as_u16().to_string();
            let documented = documented_statuses(&spec, &method, &path);
            assert!(
                documented.contains(&status),
                "{name} {method} {path}: {status}, documented {documented:?}"
            );
            if body.is_some() {
                // Malformed JSON: a documented status with the documented error body.
                let r = client
                    .request(m, &url)
                    .header("content-type", "application/json")
                    .body("{not json")
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16().to_string();
                assert!(
                    documented.contains(&status),
                    "{name} {method} {path} malformed: {status}"
                );
                let error: Value = r.json().await.unwrap();
                assert!(
                    error["error"].is_string(),
                    "{name} {method} {path}: {error}"
                );
            }
        }
        // An unknown route answers with the same error body.
        let r = client
            .get(format!("{base}/no/such/route"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        let error: Value = r.json().await.unwrap();
        assert_eq!(error["error"], "no route for /no/such/route");
    }
    // Malformed queries of the paged collection.
    let crm = format!("{}/customers", start_mocks(&shutdown).await[1].1);
    for query in ["cursor=zzz", "page=abc", "updated_since=someday"] {
        let r = client.get(format!("{crm}?{query}")).send().await.unwrap();
        assert_eq!(r.status(), 400, "{query}");
        let error: Value = r.json().await.unwrap();
        assert!(error["error"].is_string(), "{query}: {error}");
    }
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swagger_ui_renders_every_operation_in_headless_chromium() {
    let shutdown = CancellationToken::new();
    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    for (name, base) in start_mocks(&shutdown).await {
        let spec = spec_of(&base).await;
        let docs = format!("{base}/docs/");
        let run = |extra: &[String]| {
            Command::new("chromium")
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                ])
                .arg("--virtual-time-budget=20000")
                .args(extra)
                .arg(&docs)
                .output()
                .expect("chromium is installed (the test command installs it)")
        };
        let dom = String::from_utf8_lossy(&run(&["--dump-dom".into()]).stdout).to_string();
        assert!(dom.contains("swagger-ui"), "{name}: {dom}");
        for (path, item) in spec["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                // Swagger UI renders each operation as an `opblock-<method>` block whose summary
                // holds the path.
                let block = format!("opblock-{method}");
                let rendered =
                    dom.contains(&block) && dom.contains(&format!("data-path=\"{path}\""));
                assert!(rendered, "{name}: {method} {path} not rendered");
            }
        }
        let shot = shots.join(format!("swagger-ui-{name}.png"));
        let out = run(&[
            format!("--screenshot={}", shot.display()),
            "--window-size=1280,1400".into(),
        ]);
        assert!(
            out.status.success() && shot.exists(),
            "{name}: no screenshot"
        );
        eprintln!("{name}: Swagger UI screenshot at {}", shot.display());
    }
    shutdown.cancel();
}
