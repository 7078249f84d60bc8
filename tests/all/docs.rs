//! The docs stay true: every `waft` command line in the README and docs/ parses with the CLI
//! as written, the README's tour runs against a real `waft dev` exactly as written (with the
//! ports of this test's cluster put in), and the Dockerfile copies only what the build makes.

use clap::Parser;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The markdown files whose command lines are checked.
fn documents() -> Vec<PathBuf> {
    let mut docs = vec![
        root().join("README.md"),
        root().join("ARCHITECTURE.md"),
        root().join("examples/guests/README.md"),
    ];
    let mut more: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        // Generated from the CLI itself (see `the_cli_reference_matches_the_cli`).
        .filter(|p| !p.ends_with("cli.md"))
        .collect();
    more.sort();
    docs.extend(more);
    docs
}

/// The lines of the shell code blocks (```sh, ```bash, ```console) of a markdown text, with
/// their line numbers.
fn shell_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut inside = false;
    for (n, line) in text.lines().enumerate() {
        let t = line.trim_start();
        if let Some(info) = t.strip_prefix("```") {
            inside = !inside && matches!(info.trim(), "sh" | "bash" | "console" | "shell");
            continue;
        }
        if inside {
            out.push((n + 1, line.to_owned()));
        }
    }
    out
}

/// The inline code spans of a markdown text that hold a whole `waft` command line (they start
/// with `waft ` and name a subcommand or a global option), with their line numbers. Spans may
/// wrap across lines.
fn inline_commands(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut inside_block = false;
    let mut joined = String::new();
    let mut starts = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            inside_block = !inside_block;
            continue;
        }
        if !inside_block {
            starts.push((joined.len(), n + 1));
            joined.push_str(line);
            joined.push(' ');
        }
    }
    let line_of = |at: usize| {
        starts
            .iter()
            .rev()
            .find(|(s, _)| *s <= at)
            .map_or(0, |(_, n)| *n)
    };
    let mut rest = joined.as_str();
    let mut offset = 0;
    while let Some(open) = rest.find('`') {
        let Some(close) = rest[open + 1..].find('`') else {
            break;
        };
        let span = &rest[open + 1..open + 1 + close];
        if span.starts_with("waft ") && !span.contains("...") && !span.contains('|') {
            out.push((line_of(offset + open), span.to_owned()));
        }
        offset += open + close + 2;
        rest = &rest[open + close + 2..];
    }
    out
}

/// The words of a shell line without its comment, or `None` for a comment or blank line.
fn words(line: &str) -> Option<(Vec<String>, String)> {
    let line = line.trim().trim_start_matches("$ ");
    // A `#` starts a comment when it begins a word outside quotes.
    let (mut quote, mut cut) = (None, line.len());
    let bytes = line.as_bytes();
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), _) if c == q => quote = None,
            (None, '#') if i == 0 || bytes[i - 1] == b' ' => {
                cut = i;
                break;
            }
            _ => {}
        }
    }
    let (code, comment) = line.split_at(cut);
    let mut w = shlex::split(code.trim().trim_end_matches('&'))?;
    if w.is_empty() {
        return None;
    }
    // Leading VAR=value assignments.
    while w.first().is_some_and(|x| {
        x.split_once('=').is_some_and(|(k, _)| {
            !k.is_empty() && k.chars().all(|c| c.is_ascii_uppercase() || c == '_')
        })
    }) {
        w.remove(0);
    }
    Some((w, comment.trim_start_matches('#').trim().to_owned()))
}

/// The waft arguments of a command line, if it runs waft: `waft ARGS`, `cargo run ... -- ARGS`,
/// `docker run ... IMAGE ARGS` (the image is `waft`).
fn waft_args(w: &[String]) -> Option<Vec<String>> {
    match w.first()?.as_str() {
        "waft" | "./target/release/waft" => Some(w[1..].to_vec()),
        "cargo" if w.get(1).is_some_and(|s| s == "run") => {
            let dash = w.iter().position(|x| x == "--")?;
            Some(w[dash + 1..].to_vec())
        }
        "docker" if w.get(1).is_some_and(|s| s == "run") => {
            let image = w.iter().skip(2).position(|x| x == "waft")? + 2;
            Some(w[image + 1..].to_vec())
        }
        _ => None,
    }
}

#[test]
fn every_waft_command_line_in_the_docs_parses() {
    let mut checked = 0;
    let mut wrong = Vec::new();
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).expect("read doc");
        let name = doc
            .strip_prefix(root())
            .unwrap_or(&doc)
            .display()
            .to_string();
        let blocks = shell_lines(&text).into_iter().map(|l| (l, true));
        // What the docs once said, which the CLI never took, is caught even in an inline span.
        for wrong in [
            "waft deploy NAME my_guest.wasm",
            "waft submit NAME 'put a 1'",
        ] {
            let (w, _) = words(wrong).expect("line");
            let argv: Vec<String> = std::iter::once("waft".to_owned())
                .chain(waft_args(&w).expect("args"))
                .collect();
            let e = waft::cli::Cli::try_parse_from(&argv).expect_err("not a waft command");
            assert!(!partial(&e, &argv), "{wrong}: {e}");
        }
        let spans = inline_commands(&text).into_iter().map(|l| (l, false));
        for ((n, line), whole) in blocks.chain(spans) {
            let Some((w, _)) = words(&line) else { continue };
            let Some(args) = waft_args(&w) else { continue };
            checked += 1;
            // `...` stands for "the rest as above": the line is then not a whole command.
            let whole = whole && !w.iter().any(|a| a == "...");
            let args = args.into_iter().filter(|a| a != "...");
            let argv: Vec<String> = std::iter::once("waft".to_owned()).chain(args).collect();
            // `--version` and `--help` are whole commands that print and exit.
            if let Err(e) = waft::cli::Cli::try_parse_from(&argv)
                && !matches!(
                    e.kind(),
                    clap::error::ErrorKind::DisplayVersion | clap::error::ErrorKind::DisplayHelp
                )
                && (whole || !partial(&e, &argv))
            {
                let first = e.to_string().lines().next().unwrap_or_default().to_owned();
                wrong.push(format!("{name}:{n}: `{}`: {first}", line.trim()));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "command lines in the docs that the CLI does not take:\n{}",
        wrong.join("\n")
    );
    assert!(checked > 60, "found the docs' command lines ({checked})");
}

/// Whether a parse error only says that an inline mention (`waft node --metrics-listen ADDR`)
/// is not a whole command: required arguments left out, a placeholder (`N`, `ID`, `ADDR`)
/// where a value goes, a flag named without its value. Unknown subcommands and arguments,
/// and arguments in the wrong place, are still errors.
fn partial(e: &clap::Error, argv: &[String]) -> bool {
    use clap::error::ErrorKind;
    let placeholder =
        |a: &String| a.len() <= 12 && a.chars().all(|c| c.is_ascii_uppercase() || c == '_');
    match e.kind() {
        ErrorKind::MissingRequiredArgument | ErrorKind::DisplayHelp => true,
        ErrorKind::InvalidValue | ErrorKind::ValueValidation => {
            argv.iter().any(placeholder) || argv.last().is_some_and(|a| a.starts_with("--"))
        }
        _ => false,
    }
}

#[test]
fn the_checker_reads_shell_lines_as_a_shell_would() {
    let (w, c) =
        words("WAFT_TOKEN=x waft submit --service kv 'put a #1'   # -> OK").expect("a line");
    assert_eq!(w, ["waft", "submit", "--service", "kv", "put a #1"]);
    assert_eq!(c, "-> OK");
    assert!(words("# only a comment").is_none());
    let (w, _) = words("waft node --id 2 --join 127.0.0.1:7001 &").expect("a line");
    assert_eq!(w.last().map(String::as_str), Some("127.0.0.1:7001"));
    let (w, _) =
        words("docker run --rm -p 7001:7001 waft dev --listen-host 0.0.0.0").expect("line");
    assert_eq!(
        waft_args(&w).expect("waft args"),
        ["dev", "--listen-host", "0.0.0.0"]
    );
    let (w, _) = words("cargo run --release -- dev").expect("line");
    assert_eq!(waft_args(&w).expect("waft args"), ["dev"]);
    let spans =
        inline_commands("Run `waft submit\n--service kv 'a'` or `waft ...`.\n```sh\n`waft x`\n```");
    assert_eq!(spans, [(1, "waft submit --service kv 'a'".to_owned())]);
}

/// The README's tour: its shell lines from "## A five-minute tour" to the next `## `.
fn tour() -> Vec<(usize, String)> {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README");
    let start = readme.find("## A five-minute tour").expect("the tour");
    let end = readme[start + 3..]
        .find("\n## ")
        .map_or(readme.len(), |e| start + 3 + e);
    let first_line = readme[..start].lines().count();
    shell_lines(&readme[start..end])
        .into_iter()
        .map(|(n, l)| (n + first_line, l))
        .collect()
}

/// What a tour line promises: success, failure (`fails` in its comment), and text its output
/// holds (`-> TEXT`: the first word of TEXT).
fn promise(comment: &str) -> (bool, Option<String>) {
    let fails = comment.starts_with("fails");
    let shows = comment.strip_prefix("-> ").and_then(|t| {
        t.split([' ', ':', '('])
            .next()
            .filter(|w| !w.is_empty())
            .map(str::to_owned)
    });
    (!fails, shows)
}

#[test]
fn the_readme_tour_runs_as_written() {
    crate::support::init_tracing();
    // The README starts `waft dev` with its defaults; here on free ports, and listening on
    // 0.0.0.0 as the Dockerfile's documented command does.
    let dev = crate::support::bin::Dev::start(&["--listen-host", "0.0.0.0"]);
    assert!(
        dev.banner.contains("service `kv`"),
        "waft dev did not start: {}",
        dev.banner
    );
    // The README's 127.0.0.1:7001..7003 are this cluster's nodes 1..3.
    let port = |p: u16| dev.addr(p - 7000);
    let guests = Path::new(waft_testkit::guests::EXAMPLE_KV)
        .parent()
        .expect("guests dir")
        .display()
        .to_string();
    let lines = tour();
    assert!(lines.len() > 15, "found the tour: {lines:?}");
    let mut ran = 0;
    for (n, line) in lines {
        let Some((w, comment)) = words(&line) else {
            continue;
        };
        match w[0].as_str() {
            // The PATH line: this test runs the binary it built.
            "export" => continue,
            // The examples are built by the test kit from the same sources, into target/guests.
            "cargo" if w.contains(&"examples/guests/Cargo.toml".to_owned()) => continue,
            "waft" => {}
            other => panic!("README:{n}: the tour runs `{other}`, which this test cannot"),
        }
        let args: Vec<String> = w[1..]
            .iter()
            .map(|a| {
                let mut a = a.replace("examples/guests/target/wasm32-wasip2/release", &guests);
                for p in 7001..=7003 {
                    a = a.replace(&format!("127.0.0.1:{p}"), &port(p));
                }
                a
            })
            .collect();
        let out = crate::support::bin::waft()
            .args(&args)
            .env("WAFT_ENDPOINT", port(7001))
            .output()
            .expect("run waft");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        let (succeeds, shows) = promise(&comment);
        assert_eq!(
            out.status.success(),
            succeeds,
            "README:{n}: `{}` exited with {}:\n{stdout}{stderr}",
            line.trim(),
            out.status
        );
        if let Some(text) = shows {
            assert!(
                stdout.contains(&text),
                "README:{n}: `{}` should print {text:?}:\n{stdout}{stderr}",
                line.trim()
            );
        }
        ran += 1;
    }
    assert!(ran >= 15, "ran the tour's commands ({ran})");
    // The README's same tour with the Python package (from the checkout's source).
    let python = std::process::Command::new("python3")
        .arg(root().join("clients/python/examples/tour.py"))
        .args([port(7001), port(7002), port(7003)])
        .env("PYTHONPATH", root().join("clients/python"))
        .env(
            "WAFT_PY_STUBS",
            std::env::temp_dir().join("waft-docs-stubs"),
        )
        .output()
        .expect("run python3 (scripts/test installs its packages)");
    let out = String::from_utf8_lossy(&python.stdout);
    assert!(
        python.status.success()
            && out.contains("get greeting: hello")
            && out.contains("kv version"),
        "the Python tour:\n{out}{}",
        String::from_utf8_lossy(&python.stderr)
    );
    // And with the Node.js package (built by the test command: npm ci --prefix clients/js).
    let js = std::process::Command::new("node")
        .arg(root().join("clients/js/examples/tour.mjs"))
        .args([port(7001), port(7002), port(7003)])
        .output()
        .expect("run node (scripts/test builds clients/js)");
    let out = String::from_utf8_lossy(&js.stdout);
    assert!(
        js.status.success() && out.contains("get greeting: hello") && out.contains("kv version"),
        "the Node.js tour:\n{out}{}",
        String::from_utf8_lossy(&js.stderr)
    );
    // And with the Rust crate: `cargo test --workspace` (the test command) builds its examples
    // next to this test's own binary.
    let tour = std::env::current_exe()
        .expect("this test's path")
        .parent()
        .and_then(Path::parent)
        .expect("the profile's directory")
        .join("examples")
        .join(format!("tour{}", std::env::consts::EXE_SUFFIX));
    let rust = std::process::Command::new(&tour)
        .args([port(7001), port(7002), port(7003)])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "run {} ({e}): `cargo test --workspace` builds it, or `cargo build -p waft-client --example tour`",
                tour.display()
            )
        });
    let out = String::from_utf8_lossy(&rust.stdout);
    assert!(
        rust.status.success() && out.contains("get greeting: hello") && out.contains("kv version"),
        "the Rust tour:\n{out}{}",
        String::from_utf8_lossy(&rust.stderr)
    );
    let (status, _) = dev.stop();
    assert!(status.success(), "waft dev exited with {status}");
}

#[test]
fn the_dockerfile_copies_what_the_build_makes() {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile");
    let mut from_build = 0;
    for line in dockerfile.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.first() != Some(&"COPY") {
            continue;
        }
        if w.get(1) == Some(&"--from=build") {
            // /src/<path> in the build stage: the path our build writes.
            let src = w[2].strip_prefix("/src/").expect("a path under /src");
            let (dir, file) = src.rsplit_once('/').expect("a file");
            let made = match dir {
                "target/release" => file == "waft",
                "target/guests/wasm32-wasip2/release" => {
                    root().join(src).exists() && file.ends_with(".wasm")
                }
                other => {
                    panic!("the Dockerfile copies from {other}, which the build does not fill")
                }
            };
            assert!(
                made,
                "the Dockerfile copies {src}, which the build does not make"
            );
            from_build += 1;
        } else if w[1] != "." {
            assert!(
                root().join(w[1]).exists(),
                "the Dockerfile copies {}, which does not exist",
                w[1]
            );
        }
    }
    assert!(from_build >= 2, "found the Dockerfile's copies");
    // Its documented commands are checked by `every_waft_command_line_in_the_docs_parses`
    // (the README's `docker run` line) and run by the tour test (`dev --listen-host 0.0.0.0`).
    // Where Docker is installed, build the image and run its entrypoint.
    if Command::new("docker")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        let built = Command::new("docker")
            .args(["build", "-t", "waft-docs-test", "."])
            .current_dir(root())
            .status()
            .expect("docker build");
        assert!(built.success(), "docker build failed");
        let out = Command::new("docker")
            .args(["run", "--rm", "waft-docs-test", "dev", "--help"])
            .output()
            .expect("docker run");
        assert!(
            out.status.success(),
            "the image's entrypoint does not run waft"
        );
    }
}

/// docs/cli.md: every command's and flag's help, as `waft help` prints it.
fn cli_reference() -> String {
    use clap::CommandFactory;
    let mut cmd = waft::cli::Cli::command();
    cmd.build();
    let mut out = String::from(
        "# The `waft` command line\n\nEvery command and flag, as `waft help COMMAND` prints \
         it. Generated from the CLI's own definitions; `tests/all/docs.rs` fails when this \
         file and the CLI differ (`WAFT_BLESS=1 cargo test docs::the_cli_reference` rewrites \
         it).\n",
    );
    fn walk(cmd: &mut clap::Command, path: &str, out: &mut String) {
        // The values in this process's environment are not part of the reference.
        let mut shown = cmd.clone().mut_args(|a| a.hide_env_values(true));
        let help = shown.render_long_help().to_string();
        out.push_str(&format!(
            "\n## `{path}`\n\n```text\n{}\n```\n",
            help.trim_end()
        ));
        let names: Vec<String> = cmd
            .get_subcommands()
            .filter(|s| s.get_name() != "help")
            .map(|s| s.get_name().to_owned())
            .collect();
        for name in names {
            let sub = cmd.find_subcommand_mut(&name).expect("a subcommand");
            walk(sub, &format!("{path} {name}"), out);
        }
    }
    walk(&mut cmd, "waft", &mut out);
    out
}

#[test]
fn the_cli_reference_matches_the_cli() {
    let path = root().join("docs/cli.md");
    let now = cli_reference();
    if std::env::var_os("WAFT_BLESS").is_some() {
        std::fs::write(&path, &now).expect("write docs/cli.md");
        return;
    }
    let written = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        written == now,
        "docs/cli.md is not what the CLI says; run `WAFT_BLESS=1 cargo test docs::the_cli_reference` \
         and commit it"
    );
}

/// The etcd services the endpoint registers (`node/server.rs`), by etcd's names.
fn etcd_services_served() -> Vec<String> {
    let server = std::fs::read_to_string(root().join("host/src/node/server.rs"))
        .expect("host/src/node/server.rs");
    let mut served: Vec<String> = server
        .split("crate::pb::etcd::")
        .skip(1)
        .filter_map(|rest| rest.split_once("_server::").map(|(name, _)| name))
        .map(|name| match name {
            "kv" => "KV".to_owned(),
            other => {
                let mut c = other.chars();
                c.next()
                    .map(|f| f.to_uppercase().chain(c).collect())
                    .unwrap_or_default()
            }
        })
        .collect();
    served.sort();
    served.dedup();
    served
}

#[test]
fn the_etcd_services_named_in_the_help_and_docs_are_the_ones_served() {
    use clap::CommandFactory;
    let served = etcd_services_served();
    assert!(
        served.len() >= 3,
        "found too few etcd services in node/server.rs (has it moved?): {served:?}"
    );
    let cmd = waft::cli::Cli::command();
    let node = cmd.find_subcommand("node").expect("waft node");
    let help = node
        .get_arguments()
        .find(|a| a.get_id() == "etcd_listen")
        .and_then(|a| a.get_long_help().or(a.get_help()))
        .map(|h| h.to_string())
        .expect("--etcd-listen has help");
    let doc = std::fs::read_to_string(root().join("docs/etcd.md")).expect("docs/etcd.md");
    // The opening paragraph, which says what the endpoint serves.
    let opening = doc
        .split("\n\n")
        .find(|p| p.contains("--etcd-listen"))
        .expect("docs/etcd.md names --etcd-listen")
        .to_owned();
    for name in [
        "KV",
        "Watch",
        "Lease",
        "Cluster",
        "Maintenance",
        "Auth",
        "Election",
        "Lock",
    ] {
        let is_served = served.iter().any(|s| s == name);
        let in_help = help
            .split(|c: char| !c.is_ascii_alphanumeric())
            .any(|w| w == name);
        let in_doc = opening.contains(&format!("`{name}`"));
        assert_eq!(
            in_help, is_served,
            "`waft node --help` on --etcd-listen ({help:?}) and the services node/server.rs \
             serves ({served:?}) disagree about {name}"
        );
        assert_eq!(
            in_doc, is_served,
            "docs/etcd.md's opening paragraph and the services node/server.rs serves \
             ({served:?}) disagree about {name}"
        );
    }
}

/// The snapshot file's magic the code writes (`WAFTSNP6`), read from its source.
fn snapshot_magic() -> String {
    let code = std::fs::read_to_string(root().join("host/src/storage/snapshot.rs"))
        .expect("host/src/storage/snapshot.rs");
    code.split("const MAGIC: &[u8; 8] = b\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("snapshot.rs defines MAGIC")
        .to_owned()
}

#[test]
fn the_snapshot_format_named_in_architecture_md_is_the_one_written() {
    let magic = snapshot_magic();
    let magic = magic.as_str();
    let arch = std::fs::read_to_string(root().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let named: Vec<&str> = arch
        .match_indices("WAFTSNP")
        .map(|(i, _)| &arch[i..(i + 8).min(arch.len())])
        .collect();
    assert!(
        !named.is_empty(),
        "ARCHITECTURE.md no longer names the snapshot format ({magic})"
    );
    for n in named {
        assert_eq!(
            n, magic,
            "ARCHITECTURE.md names snapshot format {n}; the code writes {magic}"
        );
    }
    // The code map says the format's number in words too.
    let flat = arch.split_whitespace().collect::<Vec<_>>().join(" ");
    let number = &magic["WAFTSNP".len()..];
    let said: Vec<&str> = flat
        .match_indices("snapshot file format, ")
        .map(|(i, m)| &flat[i + m.len()..i + m.len() + 1])
        .collect();
    assert!(
        !said.is_empty(),
        "the code map no longer says the snapshot file format"
    );
    for n in said {
        assert_eq!(
            n, number,
            "ARCHITECTURE.md's code map says snapshot file format {n}; the code writes {number}"
        );
    }
}

/// CHANGELOG.md's newest release is the version the build reports, and its table of formats
/// names the snapshot format and the engine fingerprint the code writes.
#[test]
fn the_changelog_names_this_version_and_its_formats() {
    let log = std::fs::read_to_string(root().join("CHANGELOG.md")).expect("CHANGELOG.md");
    let newest = log
        .lines()
        .find_map(|l| l.strip_prefix("## "))
        .expect("a release heading");
    assert!(
        newest.starts_with(env!("CARGO_PKG_VERSION")),
        "CHANGELOG.md's newest release is {newest:?}; the build is {}",
        env!("CARGO_PKG_VERSION")
    );
    let section = log
        .split("\n## ")
        .nth(1)
        .expect("the newest release's section");
    let magic = snapshot_magic();
    let engine =
        std::fs::read_to_string(root().join("host/src/runtime/engine.rs")).expect("engine.rs");
    let fingerprint = engine
        .split("h.update(b\"")
        .nth(1)
        .and_then(|rest| rest.split('\\').next())
        .expect("engine.rs names its fingerprint");
    for format in [magic.as_str(), fingerprint] {
        assert!(
            section.contains(&format!("`{format}`")),
            "CHANGELOG.md's {newest} does not name the format {format} the code writes"
        );
    }
}
