//! The documents a newcomer reads first stay true to the code: every invariant in
//! ARCHITECTURE.md names, as `file`: `function`, code that exists, and the README stays a front
//! door whose links lead somewhere.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::path::Path;

fn read(path: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// The `file`: `symbol` pairs of one text (code spans are between backticks).
fn named_code(text: &str) -> Vec<(String, String)> {
    let parts: Vec<&str> = text.split('`').collect();
    let mut pairs = Vec::new();
    // Odd parts are code spans; a span ending in `.rs` followed by `: ` and a span is a pair.
    for i in (1..parts.len().saturating_sub(2)).step_by(2) {
        if parts[i].ends_with(".rs") && parts[i + 1].trim() == ":" {
            pairs.push((parts[i].to_owned(), parts[i + 2].to_owned()));
        }
    }
    pairs
}

/// Whether `source` defines `symbol`: `fn name`, and for `Type::name` inside an `impl` of `Type`
/// (from that `impl` line to the next top-level item).
fn defines(source: &str, symbol: &str) -> bool {
    let is_fn = |l: &str, name: &str| {
        l.contains(&format!("fn {name}(")) || l.contains(&format!("fn {name}<"))
    };
    let Some((ty, name)) = symbol.rsplit_once("::") else {
        return source.lines().any(|l| is_fn(l, symbol));
    };
    let mut in_impl = false;
    for line in source.lines() {
        if line.starts_with("impl") {
            in_impl = line
                .split(|c: char| !c.is_alphanumeric() && c != '_')
                .any(|w| w == ty);
        } else if line.starts_with(|c: char| c.is_alphabetic()) {
            in_impl = false;
        }
        if in_impl && is_fn(line, name) {
            return true;
        }
    }
    false
}

#[test]
fn every_invariant_names_functions_that_exist_where_it_says() {
    let arch = read("ARCHITECTURE.md");
    let start = arch.find("## Invariants").expect("an invariants section");
    let section = &arch[start..];
    let end = section[3..].find("\n## ").map_or(section.len(), |e| e + 3);
    let section = &section[..end];
    let bullets: Vec<&str> = section.split("\n* **I").skip(1).collect();
    assert_eq!(bullets.len(), 6, "I1 to I6");
    for bullet in bullets {
        let name = bullet.split("**").next().unwrap_or_default();
        let pairs = named_code(bullet);
        assert!(!pairs.is_empty(), "I{name} names no `file`: `function`");
        for (file, symbol) in pairs {
            let source = read(&file);
            assert!(
                defines(&source, &symbol),
                "I{name}: {file} does not define {symbol}"
            );
        }
    }
}

#[test]
fn the_readme_is_a_front_door_and_its_local_links_resolve() {
    let readme = read("README.md");
    let lines = readme.lines().count();
    assert!(
        lines <= 250,
        "README.md has {lines} lines; details belong in docs/"
    );
    assert!(readme.contains("./scripts/test.sh"), "the test command");
    for doc in [
        "README.md",
        "ARCHITECTURE.md",
        "docs/guarantees.md",
        "docs/configuration.md",
        "docs/operations.md",
        "docs/performance.md",
        "docs/testing.md",
    ] {
        let text = read(doc);
        let dir = Path::new(doc).parent().unwrap_or(Path::new(""));
        for link in text.split("](").skip(1) {
            let target = link.split(')').next().unwrap_or_default();
            let file = target.split('#').next().unwrap_or_default();
            if file.is_empty() || file.contains("://") {
                continue;
            }
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir).join(file);
            assert!(
                path.exists(),
                "{doc} links to {target}, which does not exist"
            );
        }
    }
}

#[test]
fn the_pair_reader_and_the_definition_check_can_fail() {
    let pairs = named_code("kept (`a/b.rs`: `T::f`, and `c.rs` alone; `d.rs`: `g`)");
    assert_eq!(
        pairs,
        [
            ("a/b.rs".to_owned(), "T::f".to_owned()),
            ("d.rs".to_owned(), "g".to_owned())
        ]
    );
    assert!(defines("impl T {\n    fn f() {}\n}", "T::f"));
    assert!(!defines("impl U {\n    fn f() {}\n}", "T::f"));
    assert!(!defines("impl T {}\nimpl U {\n    fn f() {}\n}", "T::f"));
    assert!(!defines("fn other() {}", "g"));
}
