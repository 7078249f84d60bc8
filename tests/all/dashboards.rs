//! What ships in `deploy/` for Prometheus and Grafana stays true to what a node exports: every
//! series and label the alert rules, their unit tests and the dashboard name is one a node
//! serves, the rules pass `promtool check rules` and fire as their unit tests say
//! (`promtool test rules`), and the exposition passes promtool's linter. Called from
//! `metrics::metrics_show_raft_progress_services_and_audits` with what its nodes served.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

/// Every series name in the expositions, with the label names its samples carry. A histogram's
/// `_bucket`, `_sum` and `_count` series are names of their own.
pub(crate) fn exported(texts: &[&str]) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for text in texts {
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut words = rest.split(' ');
                let (Some(name), Some(kind)) = (words.next(), words.next()) else {
                    panic!("a TYPE line without a name and kind: {line}");
                };
                out.entry(name.to_owned()).or_default();
                if kind == "histogram" {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        out.entry(format!("{name}{suffix}")).or_default();
                    }
                }
            } else if !line.starts_with('#') && !line.is_empty() {
                let (name, labels) = series(line);
                out.entry(name).or_default().extend(labels);
            }
        }
    }
    out
}

/// A sample line's series name and label names (`name{a="x",b="y"} 1`).
fn series(line: &str) -> (String, Vec<String>) {
    let end = line.find(['{', ' ']).unwrap_or(line.len());
    let name = line[..end].to_owned();
    let labels = if line[end..].starts_with('{') {
        matcher_keys(&line[end + 1..]).0
    } else {
        Vec::new()
    };
    (name, labels)
}

/// The label names of a matcher list or label set that starts just after its `{`, and how far
/// it runs (to just after its `}`). Values are quoted strings with backslash escapes.
fn matcher_keys(s: &str) -> (Vec<String>, usize) {
    let bytes = s.as_bytes();
    let (mut keys, mut i) = (Vec::new(), 0);
    loop {
        while i < bytes.len() && (bytes[i] == b' ' || bytes[i] == b',') {
            i += 1;
        }
        if i >= bytes.len() || bytes[i] == b'}' {
            return (keys, i + 1);
        }
        let start = i;
        while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
            i += 1;
        }
        keys.push(s[start..i].to_owned());
        // The operator (=, !=, =~, !~), then the quoted value.
        while i < bytes.len() && bytes[i] != b'"' {
            i += 1;
        }
        i += 1;
        while i < bytes.len() && bytes[i] != b'"' {
            i += if bytes[i] == b'\\' { 2 } else { 1 };
        }
        i += 1;
    }
}

/// A name a query uses, with the label names its matchers (`{...}`) name.
#[derive(Debug)]
struct Use {
    name: String,
    matchers: Vec<String>,
}

/// The waft and process series a PromQL expression (or a text holding some) names, outside
/// quoted strings and `$variables`, and the labels its `by (...)`/`without (...)` clauses name.
fn uses(expr: &str) -> (Vec<Use>, Vec<String>) {
    let bytes = expr.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let (mut found, mut grouped, mut i) = (Vec::new(), Vec::new(), 0);
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'"' {
            i += 1;
            while i < bytes.len() && bytes[i] != b'"' {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
        } else if ident(b) && (i == 0 || !(ident(bytes[i - 1]) || bytes[i - 1] == b'$')) {
            let start = i;
            while i < bytes.len() && ident(bytes[i]) {
                i += 1;
            }
            let word = &expr[start..i];
            let rest = expr[i..].trim_start();
            if (word == "by" || word == "without") && rest.starts_with('(') {
                let close = rest.find(')').expect("a closing parenthesis");
                grouped.extend(rest[1..close].split(',').map(|l| l.trim().to_owned()));
            } else if word.starts_with("waft_") || word.starts_with("process_") || word == "up" {
                let matchers = if expr[i..].starts_with('{') {
                    let (keys, len) = matcher_keys(&expr[i + 1..]);
                    i += 1 + len;
                    keys
                } else {
                    Vec::new()
                };
                found.push(Use {
                    name: word.to_owned(),
                    matchers,
                });
            }
        } else {
            i += 1;
        }
    }
    (found, grouped)
}

/// Labels Prometheus adds to every scraped series, and the one histograms' buckets carry.
const SCRAPE_LABELS: [&str; 3] = ["job", "instance", "le"];

/// Checks that every series and label `expr` names is exported (`up` is Prometheus' own).
fn check_names(what: &str, expr: &str, exported: &BTreeMap<String, BTreeSet<String>>) {
    let all_labels: BTreeSet<&str> = exported
        .values()
        .flatten()
        .map(String::as_str)
        .chain(SCRAPE_LABELS)
        .collect();
    let (found, grouped) = uses(expr);
    for u in found {
        if u.name == "up" {
            continue;
        }
        let labels = exported
            .get(&u.name)
            .unwrap_or_else(|| panic!("{what} names {}, which no node exports", u.name));
        for key in &u.matchers {
            assert!(
                labels.contains(key) || SCRAPE_LABELS.contains(&key.as_str()),
                "{what}: {} has no label {key} (it has {labels:?})",
                u.name
            );
        }
    }
    for label in grouped {
        assert!(
            all_labels.contains(label.as_str()),
            "{what} groups by {label}, which no series has"
        );
    }
}

fn promtool(args: &[&str], stdin: Option<&str>) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(args)
        .current_dir(deploy("prometheus"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool runs (scripts/test installs Debian's prometheus package, which has it)");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).expect("write to promtool");
    }
    drop(input);
    let out = child.wait_with_output().expect("promtool ends");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{said}");
    // `check metrics` exits 0 with lint findings printed; there must be none.
    if args.first() == Some(&"check") && args.get(1) == Some(&"metrics") {
        assert!(said.trim().is_empty(), "promtool's linter: {said}");
    }
}

/// Every PromQL expression and variable query in the dashboard, with where it is.
fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for p in panels {
        let id = p["id"].as_u64().expect("a panel id");
        assert!(ids.insert(id), "panel id {id} twice");
        assert!(
            p["gridPos"]["w"].as_u64().is_some(),
            "panel {id} has no place"
        );
        if p["type"] == "row" {
            continue;
        }
        let title = p["title"].as_str().expect("a title");
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} queries nothing");
        for t in targets {
            let expr = t["expr"].as_str().expect("an expression");
            out.push((format!("panel {title:?}"), expr.to_owned()));
        }
    }
    for v in dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
    {
        if let Some(q) = v["query"]["query"].as_str() {
            out.push((format!("variable {}", v["name"]), q.to_owned()));
        }
    }
    out
}

/// Series only the `waft` binary exports (it chooses the allocator; an in-process node does
/// not know it). `process::waft_dev_serves_the_etcd_api_and_metrics_when_asked` runs these
/// checks on a `waft dev` process, where they are exported.
const BINARY_ONLY: [&str; 2] = [
    "waft_allocator_allocated_bytes",
    "waft_allocator_resident_bytes",
];

pub(crate) fn check(texts: &[&str]) {
    let mut exported = exported(texts);
    for name in BINARY_ONLY {
        exported.entry(name.to_owned()).or_default();
    }
    for name in ["waft_raft_replication_lag_entries", "waft_service_version"] {
        assert!(
            !exported[name].is_empty(),
            "the cluster served no sample of {name}: the label checks need one"
        );
    }
    // The alert rules and their tests: their whole text, outside quoted strings (the
    // descriptions), names only exported series.
    for file in ["alerts.yml", "alerts_test.yml"] {
        let text = std::fs::read_to_string(deploy(&format!("prometheus/{file}"))).expect("read");
        check_names(file, &text, &exported);
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy("grafana/waft.json")).expect("read the dashboard"),
    )
    .expect("the dashboard is JSON");
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() > 30, "{}", queries.len());
    let variables: BTreeSet<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    for (what, expr) in &queries {
        check_names(&format!("waft.json {what}"), expr, &exported);
        for var in expr.split('$').skip(1) {
            let name: String = var
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                name.starts_with("__") || variables.contains(name.as_str()),
                "waft.json {what} uses ${name}, which is not a variable"
            );
        }
    }
    // Every family a node exports has a place on the dashboard.
    let on_dashboard: BTreeSet<String> = queries
        .iter()
        .flat_map(|(_, e)| uses(e).0)
        .map(|u| u.name)
        .collect();
    for name in exported.keys() {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| exported.contains_key(*f)))
            .unwrap_or(name);
        let shown = on_dashboard
            .iter()
            .any(|d| d == family || d.strip_suffix("_bucket") == Some(family) || d == name);
        assert!(shown, "the dashboard shows nothing of {family}");
    }
    promtool(&["check", "rules", "alerts.yml"], None);
    promtool(&["test", "rules", "alerts_test.yml"], None);
    promtool(&["check", "config", "prometheus.yml"], None);
    for text in texts {
        promtool(&["check", "metrics"], Some(text));
    }
}
