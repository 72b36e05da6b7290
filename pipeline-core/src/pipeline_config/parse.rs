//! Reading a pipeline file: TOML with `${VAR}` interpolation, every error placed at its file,
//! line and key.

use std::collections::HashSet;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::validate::{check_side, check_source};
use super::*;

/// The file as written, with the positions of its entries.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    sources: Vec<Spanned<SourceConfig>>,
    join: Spanned<RawJoin>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJoin {
    sides: Vec<Spanned<JoinSide>>,
}

impl PipelineConfig {
    /// Reads and checks a pipeline file, taking `${VAR}`s from the process environment.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            origin: origin.clone(),
            line: None,
            key: "(file)".into(),
            message: format!("cannot read it: {e}"),
        })?;
        Self::parse(&text, &origin, &|v| std::env::var(v).ok())
    }

    /// Parses and checks a pipeline file's text; `env` answers `${VAR}` and `value_env` lookups.
    pub fn parse(
        text: &str,
        origin: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let at = |span: std::ops::Range<usize>, key: String, message: String| ConfigError {
            origin: origin.to_owned(),
            line: Some(line_of(text, span.start)),
            key,
            message,
        };
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start));
            ConfigError {
                origin: origin.to_owned(),
                line,
                key: "(toml)".into(),
                message: e.message().trim().to_owned(),
            }
        })?;
        let mut sources = Vec::with_capacity(raw.sources.len());
        for (i, spanned) in raw.sources.into_iter().enumerate() {
            let span = spanned.span();
            let mut s = spanned.into_inner();
            let key = |k: &str| format!("sources[{i}] ({}).{k}", s.name);
            s.base_url =
                interpolate(&s.base_url, env).map_err(|m| at(span.clone(), key("base_url"), m))?;
            s.path = interpolate(&s.path, env).map_err(|m| at(span.clone(), key("path"), m))?;
            if let Err((k, m)) = check_source(&s, env) {
                return Err(at(span, key(k), m));
            }
            sources.push((span, s));
        }
        let mut names = HashSet::new();
        for (span, s) in &sources {
            if !names.insert(s.name.as_str()) {
                return Err(at(
                    span.clone(),
                    format!("sources ({}).name", s.name),
                    "another source has the same name".into(),
                ));
            }
        }
        let join_span = raw.join.span();
        let raw_join = raw.join.into_inner();
        let mut sides = Vec::with_capacity(raw_join.sides.len());
        for (i, spanned) in raw_join.sides.into_iter().enumerate() {
            let span = spanned.span();
            let side = spanned.into_inner();
            let key = |k: &str| format!("join.sides[{i}] ({}).{k}", side.name);
            if let Err((k, m)) = check_side(&side) {
                return Err(at(span, key(k), m));
            }
            if !sources.iter().any(|(_, s)| s.topic == side.topic) {
                return Err(at(
                    span,
                    key("topic"),
                    format!("no source publishes to topic {:?}", side.topic),
                ));
            }
            sides.push((span, side));
        }
        let config = Self {
            origin: origin.to_owned(),
            sources: sources.into_iter().map(|(_, s)| s).collect(),
            join: JoinConfig {
                sides: sides.iter().map(|(_, s)| s.clone()).collect(),
            },
        };
        config.check_join().map_err(|(k, m)| at(join_span, k, m))?;
        Ok(config)
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).map_or(0, |t| t.matches('\n').count()) + 1
}

/// Replaces `${VAR}` and `${VAR:-default}` with values from `env`.
pub fn interpolate(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unterminated `${{` in {s:?}"))?;
        let expr = &after[..end];
        let (var, default) = match expr.split_once(":-") {
            Some((v, d)) => (v, Some(d)),
            None => (expr, None),
        };
        match (env(var).filter(|v| !v.is_empty()), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => return Err(format!("environment variable {var} is not set")),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}
