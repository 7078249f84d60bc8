//! Builds every guest (examples/guests and tests/guests) for wasm32-wasip2 and emits one path
//! constant per component, so no test hard-codes a path and every build is fresh. The Rust
//! guests build through `waft-guest-build` (tools/guest-build), as the host's own build does.

use std::path::{Path, PathBuf};
use std::process::Command;
use waft_guest_build::{TARGET, build_workspace, root, target_dir};

const WORKSPACES: &[&str] = &["examples/guests", "tests/guests"];

fn main() {
    let root = root();
    let target_dir = target_dir(&root);
    let mut constants = String::new();
    for ws in WORKSPACES {
        for (crate_name, wasm) in build_workspace(&root, &root.join(ws), &target_dir) {
            let prefix = if ws.starts_with("examples") {
                "EXAMPLE"
            } else {
                "TEST"
            };
            constants.push_str(&format!(
                "/// `{ws}`'s `{crate_name}`, built for {TARGET}.\npub const {prefix}_{}: &str = {:?};\n",
                crate_name.to_uppercase(),
                wasm.display().to_string()
            ));
        }
    }
    for guest in FOREIGN {
        let built = foreign(&root, guest, &target_dir);
        constants.push_str(&format!(
            "/// `{}`, or why it could not be built here.\npub const {}: Result<&str, &str> = {:?};\n",
            guest.dir, guest.constant, built
        ));
    }
    for (dir, source, constant) in [
        ("examples/guests/kv-c", "kv.c", "EXAMPLE_KV_C"),
        ("tests/guests/hostile-c", "hostile.c", "TEST_HOSTILE_C"),
    ] {
        let built = c_guest(&root, dir, &[source], &target_dir);
        constants.push_str(&format!(
            "/// `{dir}`, or why it could not be built here.\npub const {constant}: Result<&str, &str> = {built:?};\n"
        ));
    }
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("guests.rs");
    std::fs::write(&out, constants).expect("write guests.rs");
}

/// A guest written in another language, built by that language's component tool.
struct Foreign {
    /// Its directory, relative to the repository root.
    dir: &'static str,
    /// The constant naming its component.
    constant: &'static str,
    /// The sources the component is built from (relative to its directory).
    sources: &'static [&'static str],
    /// The tool: a command on PATH or a path relative to the guest's directory.
    tool: &'static str,
    /// The tool's arguments; `{wit}` and `{out}` are substituted.
    args: &'static [&'static str],
    /// How to install the tool, said when it is missing.
    install: &'static str,
    /// Where the tool runs, relative to the guest's directory ("": there). ComponentizeJS
    /// resolves a module's relative imports only inside the directory it runs in.
    run_in: &'static str,
}

const FOREIGN: &[Foreign] = &[
    Foreign {
        dir: "examples/guests/kv-python",
        constant: "EXAMPLE_KV_PYTHON",
        sources: &["app.py", "../helpers/python/waft_det.py"],
        tool: "componentize-py",
        args: PYTHON_ARGS,
        install: "pip install componentize-py==0.25.1",
        run_in: "",
    },
    Foreign {
        dir: "examples/guests/counter-python",
        constant: "EXAMPLE_COUNTER_PYTHON",
        sources: &[
            "app.py",
            "../helpers/python/waft_det.py",
            "../helpers/python/waft_json.py",
        ],
        tool: "componentize-py",
        args: PYTHON_ARGS,
        install: "pip install componentize-py==0.25.1",
        run_in: "",
    },
    Foreign {
        dir: "examples/guests/locks-python",
        constant: "EXAMPLE_LOCKS_PYTHON",
        sources: &[
            "app.py",
            "../helpers/python/waft_det.py",
            "../helpers/python/waft_json.py",
        ],
        tool: "componentize-py",
        args: PYTHON_V2_ARGS,
        install: "pip install componentize-py==0.25.1",
        run_in: "",
    },
    Foreign {
        dir: "tests/guests/det-python",
        constant: "TEST_DET_PYTHON",
        sources: &[
            "app.py",
            "../../../examples/guests/helpers/python/waft_det.py",
        ],
        tool: "componentize-py",
        args: PYTHON_ARGS,
        install: "pip install componentize-py==0.25.1",
        run_in: "",
    },
    Foreign {
        dir: "tests/guests/flawed-python",
        constant: "TEST_FLAWED_PYTHON",
        sources: &["app.py"],
        tool: "componentize-py",
        args: PYTHON_ARGS,
        install: "pip install componentize-py==0.25.1",
        run_in: "",
    },
    Foreign {
        dir: "tests/guests/hostile-python",
        constant: "TEST_HOSTILE_PYTHON",
        sources: &["app.py"],
        tool: "componentize-py",
        args: PYTHON_ARGS,
        install: "pip install componentize-py==0.25.1",
        run_in: "",
    },
    Foreign {
        dir: "examples/guests/kv-js",
        constant: "EXAMPLE_KV_JS",
        sources: &["kv.js", "package.json", "package-lock.json"],
        tool: "node_modules/.bin/componentize-js",
        args: &[
            "kv.js",
            "--wit",
            "{wit}",
            "-n",
            "guest",
            "-d",
            "http",
            "fetch-event",
            "-o",
            "{out}",
        ],
        install: "npm install --prefix examples/guests/kv-js",
        run_in: "",
    },
    Foreign {
        dir: "tests/guests/det-js",
        constant: "TEST_DET_JS",
        sources: &["det.js"],
        tool: "../../../examples/guests/kv-js/node_modules/.bin/componentize-js",
        args: &[
            "det.js",
            "--wit",
            "{wit}",
            "-n",
            "guest",
            "-d",
            "http",
            "fetch-event",
            "-o",
            "{out}",
        ],
        install: "npm install --prefix examples/guests/kv-js",
        run_in: "",
    },
    Foreign {
        dir: "tests/guests/hostile-js",
        constant: "TEST_HOSTILE_JS",
        sources: &["hostile.js"],
        tool: "../../../examples/guests/kv-js/node_modules/.bin/componentize-js",
        args: &[
            "hostile.js",
            "--wit",
            "{wit}",
            "-n",
            "guest",
            "-d",
            "http",
            "fetch-event",
            "-o",
            "{out}",
        ],
        install: "npm install --prefix examples/guests/kv-js",
        run_in: "",
    },
    Foreign {
        dir: "examples/guests/counter-js",
        constant: "EXAMPLE_COUNTER_JS",
        sources: &["counter.js", "../helpers/js/waft_json.js"],
        tool: "../kv-js/node_modules/.bin/componentize-js",
        args: &[
            "counter-js/counter.js",
            "--wit",
            "{wit}",
            "-n",
            "guest",
            "-d",
            "http",
            "fetch-event",
            "-o",
            "{out}",
        ],
        install: "npm install --prefix examples/guests/kv-js",
        run_in: "..",
    },
    Foreign {
        dir: "examples/guests/locks-js",
        constant: "EXAMPLE_LOCKS_JS",
        sources: &["locks.js", "../helpers/js/waft_json.js"],
        tool: "../kv-js/node_modules/.bin/componentize-js",
        args: &[
            "locks-js/locks.js",
            "--wit",
            "{wit}/v0.2",
            "-n",
            "guest",
            "-d",
            "http",
            "fetch-event",
            "-o",
            "{out}",
        ],
        install: "npm install --prefix examples/guests/kv-js",
        run_in: "..",
    },
];

/// componentize-py's arguments for a guest whose module is `app.py`, with the determinism
/// helper (examples/guests/helpers/python) on the path.
const PYTHON_ARGS: &[&str] = &[
    "-d",
    "{wit}",
    "-w",
    "guest",
    "componentize",
    "app",
    "-p",
    ".",
    "-p",
    "{helpers}/python",
    "-o",
    "{out}",
];
/// The same, against the 0.2.0 world (timers, events).
const PYTHON_V2_ARGS: &[&str] = &[
    "-d",
    "{wit}/v0.2",
    "-w",
    "guest",
    "componentize",
    "app",
    "-p",
    ".",
    "-p",
    "{helpers}/python",
    "-o",
    "{out}",
];

/// Builds a foreign guest into `target_dir` unless its component is newer than its sources, the
/// WIT and the tool. A missing tool does not stop the build (tests that do not need the guest
/// still run); the tests that need it fail, saying why; a tool that fails is an error.
fn foreign(root: &Path, guest: &Foreign, target_dir: &Path) -> Result<String, String> {
    let dir = root.join(guest.dir);
    let wit = root.join("wit");
    let helpers = root.join("examples/guests/helpers");
    let name = guest.dir.rsplit('/').next().unwrap_or(guest.dir);
    let out = target_dir.join(format!("{name}.wasm"));
    let mut inputs: Vec<PathBuf> = guest.sources.iter().map(|s| dir.join(s)).collect();
    inputs.push(wit.join("fsm.wit"));
    inputs.push(wit.join("v0.2").join("fsm.wit"));
    for input in &inputs {
        println!("cargo:rerun-if-changed={}", input.display());
    }
    let tool = if guest.tool.contains('/') {
        Some(dir.join(guest.tool)).filter(|p| p.exists())
    } else {
        on_path(guest.tool)
    };
    let Some(tool) = tool else {
        look_again(&dir);
        return Err(format!(
            "{} is not installed; run: {}",
            guest.tool, guest.install
        ));
    };
    println!("cargo:rerun-if-changed={}", tool.display());
    inputs.push(tool.clone());
    let fresh = up_to_date(&out, &inputs);
    if !fresh {
        let args: Vec<String> = guest
            .args
            .iter()
            .map(|a| {
                a.replace("{wit}", &wit.display().to_string())
                    .replace("{helpers}", &helpers.display().to_string())
                    .replace("{out}", &out.display().to_string())
            })
            .collect();
        let status = Command::new(&tool)
            .current_dir(dir.join(guest.run_in))
            .args(&args)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", tool.display()));
        assert!(
            status.success(),
            "building {} with {} failed (see the output above)",
            guest.dir,
            guest.tool
        );
    }
    Ok(out.display().to_string())
}

/// How to install what a C guest is built with (Debian's packages).
const C_INSTALL: &str = "apt-get install clang-14 lld-14 wasi-libc libclang-rt-14-dev-wasm32";

/// Builds a C guest the way examples/guests/kv-c/README.md says: wit-bindgen's C bindings for
/// the `guest` world, clang for wasm32-wasi (a reactor: no `main`), then the core module made
/// a component with the preview1 reactor adapter. Bindings and adapter come from the crates
/// registry (build dependencies); the compiler, linker, libc and builtins from Debian. A
/// missing compiler does not stop the build; the tests that need the guest fail, saying why.
fn c_guest(root: &Path, dir: &str, sources: &[&str], target_dir: &Path) -> Result<String, String> {
    let guest_dir = root.join(dir);
    let wit = root.join("wit");
    let name = dir.rsplit('/').next().unwrap_or(dir);
    let out = target_dir.join(format!("{name}.wasm"));
    let mut inputs: Vec<PathBuf> = sources.iter().map(|s| guest_dir.join(s)).collect();
    inputs.push(wit.join("fsm.wit"));
    for input in &inputs {
        println!("cargo:rerun-if-changed={}", input.display());
    }
    let Some(clang) = on_path("clang-14").or_else(|| on_path("clang")) else {
        look_again(&guest_dir);
        return Err(format!("clang is not installed; run: {C_INSTALL}"));
    };
    if let Some(missing) = c_toolchain_missing(&clang) {
        look_again(&guest_dir);
        return Err(format!(
            "{} has no {missing} for wasm32-wasi; run: {C_INSTALL}",
            clang.display()
        ));
    }
    let fresh = up_to_date(&out, &inputs);
    if fresh {
        return Ok(out.display().to_string());
    }
    // The bindings: guest.h, guest.c and the component type as an object file.
    let bindings = target_dir.join(format!("{name}-bindings"));
    std::fs::create_dir_all(&bindings).expect("create the bindings directory");
    let mut resolve = wit_bindgen_core::wit_parser::Resolve::default();
    let (package, _) = resolve
        .push_dir(&wit)
        .unwrap_or_else(|e| panic!("cannot read {}: {e:?}", wit.display()));
    let world = resolve
        .select_world(&[package], Some("guest"))
        .expect("the guest world");
    let mut files = wit_bindgen_core::Files::default();
    wit_bindgen_c::Opts::default()
        .build()
        .generate(&resolve, world, &mut files)
        .unwrap_or_else(|e| panic!("wit-bindgen c: {e:?}"));
    let mut objects = Vec::new();
    for (file, bytes) in files.iter() {
        let path = bindings.join(file);
        std::fs::write(&path, bytes).expect("write the bindings");
        if !file.ends_with(".h") {
            objects.push(path);
        }
    }
    // The core module: a reactor, optimized, without the paths of this machine in it.
    let core = target_dir.join(format!("{name}.core.wasm"));
    let output = Command::new(&clang)
        .current_dir(&guest_dir)
        .args([
            "--target=wasm32-wasi",
            "-mexec-model=reactor",
            "-O2",
            "-Wall",
            "-Werror",
        ])
        .arg(format!("-ffile-prefix-map={}=.", root.display()))
        .arg("-I")
        .arg(&bindings)
        .args(sources)
        .args(&objects)
        .arg("-o")
        .arg(&core)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", clang.display()));
    assert!(
        output.status.success(),
        "building {dir} with {} failed:\n{}",
        clang.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let module = std::fs::read(&core).expect("read the core module");
    let component = wit_component::ComponentEncoder::default()
        .module(&module)
        .and_then(|e| {
            e.validate(true).adapter(
                wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME,
                wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
            )
        })
        .and_then(|mut e| e.encode())
        .unwrap_or_else(|e| panic!("making {dir} a component: {e:?}"));
    std::fs::write(&out, component).expect("write the component");
    Ok(out.display().to_string())
}

/// What `clang` lacks to build for wasm32-wasi, asked of clang itself: the libc, the builtins
/// or the linker.
fn c_toolchain_missing(clang: &Path) -> Option<&'static str> {
    let ask = |flag: &str| {
        Command::new(clang)
            .args(["--target=wasm32-wasi", flag])
            .output()
            .ok()
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
    };
    let exists = |p: Option<PathBuf>| p.is_some_and(|p| p.is_absolute() && p.exists());
    if !exists(ask("-print-file-name=libc.a")) {
        return Some("libc (wasi-libc)");
    }
    if !exists(ask("-print-libgcc-file-name")) {
        return Some("builtins (libclang-rt-14-dev-wasm32)");
    }
    // clang runs the wasm-ld beside it (in LLVM's bin directory), else one on PATH.
    let beside = std::fs::canonicalize(clang)
        .ok()
        .and_then(|c| c.parent().map(|d| d.join("wasm-ld")));
    if !exists(beside) && on_path("wasm-ld").is_none() {
        return Some("linker (wasm-ld, lld-14)");
    }
    None
}

/// Whether `out` exists and is newer than every one of `inputs`.
fn up_to_date(out: &Path, inputs: &[PathBuf]) -> bool {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    modified(out).is_some_and(|built| {
        inputs
            .iter()
            .all(|i| modified(i).is_some_and(|m| m <= built))
    })
}

/// Asks cargo to run this script again once `dir`'s tool may have been installed.
fn look_again(dir: &Path) {
    println!(
        "cargo:rerun-if-changed={}",
        dir.join(".tool-missing").display()
    );
}

/// The full path of `name` if it is an executable on PATH.
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
