//! No two source files import each other, directly or through a ring, in any crate of the
//! workspace: each file's `crate::`, `super::` and `self::` paths (re-exports followed to the
//! file that defines the name) form a graph that must have no cycle. A file may use its
//! ancestors (the `mod.rs` or `lib.rs` that declares it); an ancestor reaching back down into
//! a child that uses it would be a ring, and is found.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// A module path inside one crate: `["storage", "state_machine", "heal"]`; the crate root is
/// empty.
type ModPath = Vec<String>;

/// The module of a file relative to the crate's source root (`storage/wal.rs` → storage::wal,
/// `storage/mod.rs` → storage, `lib.rs`/`main.rs` → the root).
fn module_of(rel: &str) -> ModPath {
    let mut parts: Vec<String> = rel
        .trim_end_matches(".rs")
        .split('/')
        .map(str::to_owned)
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    if parts.len() == 1 && (parts[0] == "lib" || parts[0] == "main") {
        parts.clear();
    }
    parts
}

/// The code of a file without its inline `#[cfg(test)]` modules (whose `super::` means the
/// file itself).
fn without_test_modules(code: &str) -> &str {
    let mut from = 0;
    while let Some(i) = code[from..].find("#[cfg(test)]") {
        let at = from + i;
        let rest = code[at + "#[cfg(test)]".len()..].trim_start();
        let rest = ["pub(crate) ", "pub(super) ", "pub "]
            .iter()
            .find_map(|p| rest.strip_prefix(p))
            .unwrap_or(rest);
        if let Some(decl) = rest.strip_prefix("mod ") {
            let name_end = decl.find(|c: char| !is_ident(c)).unwrap_or(decl.len());
            if decl[name_end..].trim_start().starts_with('{') {
                return &code[..at];
            }
        }
        from = at + 1;
    }
    code
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The paths a `use` tree or an inline path starting at `text` names, each as segments
/// (`a::{b, c::d}` → `a::b`, `a::c::d`; `a::{self}` → `a`).
fn paths_at(text: &str) -> Vec<Vec<String>> {
    let mut segs = Vec::new();
    let mut rest = text;
    loop {
        let ident: String = rest.chars().take_while(|&c| is_ident(c)).collect();
        if ident.is_empty() {
            break;
        }
        rest = &rest[ident.len()..];
        segs.push(ident);
        let after = rest.trim_start();
        if let Some(r) = after.strip_prefix("::") {
            let r = r.trim_start();
            if let Some(group) = r.strip_prefix('{') {
                let mut depth = 1;
                let mut end = group.len();
                for (i, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = i;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                let mut out = Vec::new();
                let mut depth = 0;
                let mut start = 0;
                let inner = &group[..end];
                let mut items = Vec::new();
                for (i, c) in inner.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            items.push(&inner[start..i]);
                            start = i + 1;
                        }
                        _ => {}
                    }
                }
                items.push(&inner[start..]);
                for item in items {
                    let item = item.trim();
                    if item.is_empty() || item == "*" {
                        continue;
                    }
                    if item == "self" || item.starts_with("self ") {
                        out.push(segs.clone());
                        continue;
                    }
                    for p in paths_at(item) {
                        let mut full = segs.clone();
                        full.extend(p);
                        out.push(full);
                    }
                }
                return out;
            }
            rest = r;
            continue;
        }
        break;
    }
    if segs.is_empty() {
        Vec::new()
    } else {
        vec![segs]
    }
}

/// Names a module re-exports (`pub use a::b::C;`, `pub(crate) use a::{B, C as D};`): name →
/// the path it stands for.
fn reexports(code: &str) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for (i, _) in code.match_indices("use ") {
        let before = code[..i].trim_end();
        if !["pub", "pub(crate)", "pub(super)"]
            .iter()
            .any(|p| before.ends_with(p))
        {
            continue;
        }
        let stmt = &code[i + 4..];
        let stmt = &stmt[..stmt.find(';').unwrap_or(stmt.len())];
        // `C as D` renames: keep the alias as the name.
        for path in paths_at(stmt) {
            if let Some(last) = path.last() {
                out.insert(last.clone(), path.clone());
            }
        }
        for alias in stmt.split(" as ").skip(1) {
            let name: String = alias
                .trim_start()
                .chars()
                .take_while(|&c| is_ident(c))
                .collect();
            let original: String = stmt[..stmt.find(&format!(" as {name}")).unwrap_or(0)]
                .chars()
                .rev()
                .take_while(|&c| is_ident(c))
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            if let Some(p) = out.remove(&original) {
                out.insert(name, p);
            }
        }
    }
    out
}

struct Crate {
    modules: BTreeMap<ModPath, (String, String)>,
    reexports: BTreeMap<ModPath, BTreeMap<String, Vec<String>>>,
}

impl Crate {
    fn read(src: &Path) -> Crate {
        let mut modules = BTreeMap::new();
        let mut stack = vec![src.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).expect("read dir") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let rel = path
                        .strip_prefix(src)
                        .expect("under src")
                        .to_string_lossy()
                        .replace('\\', "/");
                    let text = std::fs::read_to_string(&path).expect("read source");
                    let code: String = text
                        .lines()
                        .map(|l| l.find("//").map_or(l, |i| &l[..i]))
                        .collect::<Vec<_>>()
                        .join("\n");
                    let code = without_test_modules(&code).to_owned();
                    modules.insert(module_of(&rel), (rel, code));
                }
            }
        }
        let reexports = modules
            .iter()
            .map(|(m, (_, code))| (m.clone(), reexports(code)))
            .collect();
        Crate { modules, reexports }
    }

    /// The file module a path used in `from` lands in (following re-exports), if it names one
    /// of this crate's files.
    fn resolve(&self, from: &ModPath, path: &[String], depth: usize) -> Option<ModPath> {
        if depth > 8 || path.is_empty() {
            return None;
        }
        let (mut cur, rest): (ModPath, &[String]) = match path[0].as_str() {
            "crate" => (Vec::new(), &path[1..]),
            "self" => (from.clone(), &path[1..]),
            "super" => {
                let mut base = from.clone();
                let mut i = 0;
                while path.get(i).is_some_and(|s| s == "super") {
                    base.pop();
                    i += 1;
                }
                (base, &path[i..])
            }
            first => {
                // A path relative to `from`: only a child module of it counts.
                let mut child = from.clone();
                child.push(first.to_owned());
                if !self.modules.contains_key(&child) {
                    return None;
                }
                (from.clone(), path)
            }
        };
        for seg in rest {
            let mut next = cur.clone();
            next.push(seg.clone());
            if self.modules.contains_key(&next) {
                cur = next;
                continue;
            }
            if let Some(target) = self.reexports.get(&cur).and_then(|r| r.get(seg))
                && let Some(found) = self.resolve(&cur, target, depth + 1)
            {
                return Some(found);
            }
            break;
        }
        self.modules.contains_key(&cur).then_some(cur)
    }

    /// Each file module's uses of the crate's other file modules, ancestors left out.
    fn edges(&self) -> BTreeMap<ModPath, BTreeSet<ModPath>> {
        let mut out = BTreeMap::new();
        for (m, (_, code)) in &self.modules {
            let mut deps = BTreeSet::new();
            for start in ["crate::", "super::", "self::", "use "] {
                for (i, _) in code.match_indices(start) {
                    if code[..i]
                        .chars()
                        .next_back()
                        .is_some_and(|c| is_ident(c) || c == ':')
                    {
                        continue;
                    }
                    let at = if start == "use " { i + 4 } else { i };
                    for path in paths_at(&code[at..]) {
                        if let Some(t) = self.resolve(m, &path, 0)
                            && &t != m
                            && !(t.len() < m.len() && m[..t.len()] == t[..])
                        {
                            deps.insert(t);
                        }
                    }
                }
            }
            out.insert(m.clone(), deps);
        }
        out
    }
}

/// A ring in `edges`, as file names, if there is one.
fn find_ring(edges: &BTreeMap<ModPath, BTreeSet<ModPath>>) -> Option<Vec<ModPath>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit(
        v: &ModPath,
        edges: &BTreeMap<ModPath, BTreeSet<ModPath>>,
        marks: &mut BTreeMap<ModPath, Mark>,
        stack: &mut Vec<ModPath>,
    ) -> Option<Vec<ModPath>> {
        marks.insert(v.clone(), Mark::Open);
        stack.push(v.clone());
        for w in edges.get(v).into_iter().flatten() {
            match marks.get(w).copied().unwrap_or(Mark::New) {
                Mark::Open => {
                    let from = stack.iter().position(|x| x == w).expect("on the stack");
                    return Some(stack[from..].to_vec());
                }
                Mark::New => {
                    if let Some(ring) = visit(w, edges, marks, stack) {
                        return Some(ring);
                    }
                }
                Mark::Done => {}
            }
        }
        stack.pop();
        marks.insert(v.clone(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for v in edges.keys() {
        if marks.get(v).copied().unwrap_or(Mark::New) == Mark::New
            && let Some(ring) = visit(v, edges, &mut marks, &mut Vec::new())
        {
            return Some(ring);
        }
    }
    None
}

#[test]
fn no_two_files_import_each_other_in_any_crate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // tools/guest-build and the testkit (tests/lib.rs) are one file each.
    for src in ["host/src", "client/src", "guest-sdk/src", "tests/all"] {
        let krate = Crate::read(&root.join(src));
        assert!(krate.modules.len() > 1, "{src}: read its files");
        let edges = krate.edges();
        if let Some(ring) = find_ring(&edges) {
            let files: Vec<&str> = ring.iter().map(|m| krate.modules[m].0.as_str()).collect();
            panic!("{src}: these files import each other in a ring: {files:?}");
        }
    }
}

#[test]
fn the_ring_check_finds_rings_and_follows_re_exports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |rel: &str, code: &str| {
        let p = dir.path().join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, code).expect("write");
    };
    write("lib.rs", "mod a;\nmod b;\nmod c;\npub use c::Thing;\n");
    write("a.rs", "use crate::b::B;\n");
    write("b.rs", "use super::Thing;\n");
    write("c.rs", "pub struct Thing;\n");
    let krate = Crate::read(dir.path());
    assert!(
        find_ring(&krate.edges()).is_none(),
        "a → b → c (through lib's re-export) is no ring"
    );
    write("c.rs", "pub struct Thing;\nfn f() { crate::a::g(); }\n");
    let krate = Crate::read(dir.path());
    let ring = find_ring(&krate.edges()).expect("a → b → c → a");
    assert_eq!(ring.len(), 3, "{ring:?}");
    write(
        "c.rs",
        "pub struct Thing;\n#[cfg(test)]\nmod tests {\n    use crate::a::g;\n}\n",
    );
    let krate = Crate::read(dir.path());
    assert!(
        find_ring(&krate.edges()).is_none(),
        "a test module's uses do not count"
    );
}
