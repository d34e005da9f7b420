//! A CUDA toolkit to build kiln's `cuda` feature with, on a machine without a GPU.
//!
//! Two sources:
//! - **PyPI** (the default): CUDA [`PYPI_CUDA`] — nvcc, the runtime, cuBLAS,
//!   cuRAND and NVRTC wheels, pinned to that release — in a virtual
//!   environment under `target/cuda-<version>/` (git-ignored). Beside the pip
//!   libraries it adds the unversioned `lib*.so` links the linker looks for,
//!   and a stub `libcuda.so` (soname `libcuda.so.1`) exporting every `cu*`
//!   symbol cudarc declares, so binaries link without the driver. The stub
//!   is for linking only: at run time the GPU machine's driver provides
//!   `libcuda.so.1`. Every stub function returns `CUDA_ERROR_NO_DEVICE`.
//! - **Debian** (`--toolkit debian`): bookworm's `nvidia-cuda-toolkit`
//!   (CUDA 11.8) from `contrib` + `non-free` with apt, for compute
//!   capability 8.x and older drivers; it cannot build for 9.0 (compute_90a).
//!
//! Why a pinned toolkit: a driver JIT-compiles PTX only from a toolkit no newer
//! than itself (driver 580 = CUDA 13.0), so the PTX built here must not come
//! from a newer nvcc than the GPU machine's driver.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The CUDA release the PyPI toolkit is pinned to (driver 580 or newer runs its PTX).
pub const PYPI_CUDA: &str = "13.0";

/// The PyPI wheels of the toolkit, each pinned to the [`PYPI_CUDA`] release.
/// cuRAND has its own numbering: 10.4.0 is the one CUDA 13.0 ships.
pub const PYPI_WHEELS: &[&str] = &[
    "nvidia-cuda-nvcc==13.0.*",
    "nvidia-cuda-runtime==13.0.*",
    "nvidia-cuda-crt==13.0.*",
    "nvidia-cuda-cccl==13.0.*",
    "nvidia-nvvm==13.0.*",
    "nvidia-cublas==13.0.*",
    "nvidia-curand==10.4.0.*",
    "nvidia-cuda-nvrtc==13.0.*",
];

/// `CUresult` the stub driver returns from every call: `CUDA_ERROR_NO_DEVICE`.
const STUB_RESULT: u32 = 100;

/// Where a toolkit comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Source {
    /// CUDA 13.0 from PyPI into `--prefix` (no root needed; compute capability 7.5 to 12.x).
    Pypi,
    /// Debian bookworm's nvidia-cuda-toolkit, CUDA 11.8, with apt (root; compute capability up to 8.9).
    Debian,
}

impl Source {
    /// The compute capability `cuda-check` builds for unless told: 90 (Hopper)
    /// with CUDA 13, 80 with CUDA 11.8, whose nvcc rejects compute_90a (what
    /// candle's build turns 90 into).
    pub fn default_compute_cap(self) -> &'static str {
        match self {
            Source::Pypi => "90",
            Source::Debian => "80",
        }
    }
}

/// The workspace root (xtask's parent folder).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The target folder of every CUDA build xtask runs (`cuda-check`,
/// `gpu-bundle`): kept apart from `target/release` and `target/debug`. In the
/// default folder the bundle's xtask, which needs the driver's
/// `libcuda.so.1`, replaced `target/release/xtask`, so the binary no longer
/// started on the machine that built it (`cargo xtask` relinks it, a binary
/// run directly did not).
pub fn cuda_target_dir() -> PathBuf {
    workspace_root().join("target/cuda")
}

/// `cargo` (as `$CARGO` names it) run from the workspace root into
/// [`cuda_target_dir`], with the toolkit's environment when there is one.
pub fn cuda_cargo(tk: Option<&Toolkit>) -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    if let Some(tk) = tk {
        tk.apply(&mut c);
    }
    c.current_dir(workspace_root())
        .env("CARGO_TARGET_DIR", cuda_target_dir());
    c
}

/// The environment of a build without the AVX-512 kernels (gemm's and
/// kiln's): `RUSTFLAGS` with `--cfg kiln_no_avx512` added to the caller's, and
/// its own `CARGO_TARGET_DIR`, `target/no-avx512`, so neither build evicts the
/// other's cache (`ci --no-avx512`, `bench --no-avx512`, `gpu-bundle`).
pub fn no_avx512_env() -> [(&'static str, String); 2] {
    let flags = std::env::var("RUSTFLAGS").unwrap_or_default();
    [
        (
            "RUSTFLAGS",
            format!("{flags} --cfg kiln_no_avx512").trim().to_string(),
        ),
        (
            "CARGO_TARGET_DIR",
            workspace_root()
                .join("target/no-avx512")
                .display()
                .to_string(),
        ),
    ]
}

/// The default prefix of the PyPI toolkit: `target/cuda-13.0` in the workspace.
pub fn default_prefix() -> PathBuf {
    workspace_root()
        .join("target")
        .join(format!("cuda-{PYPI_CUDA}"))
}

/// `nvcc` in a folder of `path` (a `PATH` value): where the Debian toolkit
/// puts it (`/usr/bin/nvcc`), or `None`.
pub fn nvcc_on_path(path: Option<&OsStr>) -> Option<PathBuf> {
    std::env::split_paths(path?)
        .map(|dir| dir.join("nvcc"))
        .find(|p| p.is_file())
}

/// An installed PyPI toolkit: `root` holds `bin/nvcc`, `include/`, `lib/`
/// (with `lib/stubs/libcuda.so`), laid out as `CUDA_ROOT` expects.
#[derive(Clone, Debug)]
pub struct Toolkit {
    /// `PREFIX/root`, a link to the wheels' `nvidia/cu13` folder.
    pub root: PathBuf,
}

impl Toolkit {
    /// The toolkit under `prefix`, if `cuda-check --install` put one there.
    pub fn find(prefix: &Path) -> Option<Toolkit> {
        let root = prefix.join("root");
        root.join("bin").join("nvcc").is_file().then(|| Toolkit {
            root: absolute(&root),
        })
    }

    /// `lib/stubs`: the link-only `libcuda.so`.
    pub fn stubs(&self) -> PathBuf {
        self.root.join("lib").join("stubs")
    }

    /// The variables a build with this toolkit needs: `CUDA_ROOT` (cudarc's
    /// link search), `PATH` with `bin/` first (nvcc for candle's, kiln's and
    /// cudarc's build scripts) and `LD_LIBRARY_PATH` with `lib/` first (to run
    /// what was built on a machine whose driver is present).
    pub fn env(&self) -> Vec<(String, String)> {
        let prepend = |var: &str, dir: PathBuf| {
            let mut s = dir.display().to_string();
            if let Ok(old) = std::env::var(var) {
                let first = old.split(':').next().unwrap_or("");
                if first == s {
                    return (var.to_string(), old);
                }
                if !old.is_empty() {
                    s.push(':');
                    s.push_str(&old);
                }
            }
            (var.to_string(), s)
        };
        vec![
            ("CUDA_ROOT".into(), self.root.display().to_string()),
            prepend("PATH", self.root.join("bin")),
            prepend("LD_LIBRARY_PATH", self.root.join("lib")),
        ]
    }

    /// Sets [`Toolkit::env`] on `cmd` and removes the other variables cudarc
    /// reads a CUDA path from, so a system CUDA cannot be linked instead.
    pub fn apply(&self, cmd: &mut Command) {
        for v in ["CUDA_HOME", "CUDA_PATH", "CUDA_TOOLKIT_ROOT_DIR"] {
            cmd.env_remove(v);
        }
        for (k, v) in self.env() {
            cmd.env(k, v);
        }
    }

    /// The environment as `export` lines for a shell.
    pub fn exports(&self) -> String {
        self.env()
            .iter()
            .map(|(k, v)| format!("export {k}={}\n", shell_quote(v)))
            .collect()
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// `s` single-quoted for a POSIX shell when it holds anything but plain path characters.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-:=+,@".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Runs `cmd`, saying `what` first; an error names it and the exit status.
pub fn sh(cmd: &mut Command, what: &str) -> Result<()> {
    eprintln!("==> {what}");
    let st = cmd.status().with_context(|| format!("running {what}"))?;
    if !st.success() {
        bail!("{what} failed ({st})");
    }
    Ok(())
}

/// Installs the PyPI toolkit under `prefix`: a venv (`python3 -m venv`), the
/// [`PYPI_WHEELS`], the `root` link, the unversioned library links and the
/// stub `libcuda.so`. Running it again updates what changed and is quick.
pub fn install_pypi(prefix: &Path) -> Result<Toolkit> {
    std::fs::create_dir_all(prefix).with_context(|| format!("creating {}", prefix.display()))?;
    let venv = prefix.join("venv");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    if !venv.join("bin").join("pip").is_file() {
        sh(
            Command::new(&python).args(["-m", "venv"]).arg(&venv),
            &format!(
                "{python} -m venv {} (needs Python 3.9+ with venv)",
                venv.display()
            ),
        )?;
    }
    sh(
        Command::new(venv.join("bin").join("pip"))
            .args(["install", "--disable-pip-version-check", "--quiet"])
            .args(PYPI_WHEELS),
        &format!("pip install {}", PYPI_WHEELS.join(" ")),
    )?;
    let cu = wheels_root(&venv)?;
    let root = prefix.join("root");
    let target = cu.strip_prefix(prefix).unwrap_or(&cu).to_path_buf();
    if std::fs::read_link(&root).ok().as_deref() != Some(target.as_path()) {
        let _ = std::fs::remove_file(&root);
        std::os::unix::fs::symlink(&target, &root)
            .with_context(|| format!("linking {} -> {}", root.display(), target.display()))?;
    }
    link_unversioned(&root.join("lib"))?;
    build_stub(&root.join("lib").join("stubs"))?;
    Toolkit::find(prefix).with_context(|| {
        format!(
            "the wheels installed but {} has no bin/nvcc",
            root.display()
        )
    })
}

/// `venv/lib/python3.X/site-packages/nvidia/cu13`.
fn wheels_root(venv: &Path) -> Result<PathBuf> {
    let lib = venv.join("lib");
    let major = PYPI_CUDA.split('.').next().unwrap_or("13");
    for e in std::fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))? {
        let p = e?.path();
        let cu = p
            .join("site-packages")
            .join("nvidia")
            .join(format!("cu{major}"));
        if cu.join("bin").join("nvcc").is_file() {
            return Ok(cu);
        }
    }
    bail!(
        "no site-packages/nvidia/cu{major}/bin/nvcc under {}: did pip install nvidia-cuda-nvcc fail?",
        lib.display()
    )
}

/// `libfoo.so -> libfoo.so.N` for each `libfoo.so.N` in `lib` (the wheels ship
/// only the versioned names; `-lfoo` needs the plain one).
fn link_unversioned(lib: &Path) -> Result<()> {
    for e in std::fs::read_dir(lib).with_context(|| format!("reading {}", lib.display()))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        let Some((stem, ver)) = name.split_once(".so.") else {
            continue;
        };
        if stem.contains('.') || !ver.chars().all(|c| c.is_ascii_digit()) {
            continue; // libnvrtc.alt.so.13, libnvrtc-builtins.so.13.0
        }
        let link = lib.join(format!("{stem}.so"));
        if link.symlink_metadata().is_err() {
            std::os::unix::fs::symlink(&name, &link)
                .with_context(|| format!("linking {}", link.display()))?;
        }
    }
    Ok(())
}

/// The `cu*` functions cudarc's driver bindings link against, read from its
/// source (`src/driver/sys/mod.rs`, the `extern "C"` declarations).
pub fn cudarc_driver_symbols() -> Result<Vec<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(&cargo)
        .current_dir(workspace_root())
        .args([
            "metadata",
            "--format-version",
            "1",
            "--features",
            "kiln-core/cuda",
        ])
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("reading cargo metadata's JSON")?;
    let manifest = meta["packages"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "cudarc"))
        .and_then(|p| p["manifest_path"].as_str())
        .context("cargo metadata lists no cudarc package (is candle-core's cuda feature gone?)")?;
    let src = Path::new(manifest)
        .parent()
        .unwrap_or(Path::new("."))
        .join("src/driver/sys/mod.rs");
    let text =
        std::fs::read_to_string(&src).with_context(|| format!("reading {}", src.display()))?;
    let syms = driver_symbols_in(&text);
    if syms.is_empty() {
        bail!(
            "found no `fn cu...(` declarations in {}: cudarc's layout changed",
            src.display()
        );
    }
    Ok(syms)
}

/// The names of the indented `fn cuXxx(` lines (the `extern "C"` blocks'
/// declarations; the public wrappers start with `pub`), sorted, once each.
pub fn driver_symbols_in(src: &str) -> Vec<String> {
    let mut v: Vec<String> = src
        .lines()
        .filter(|l| l.starts_with(char::is_whitespace))
        .filter_map(|l| l.trim_start().strip_prefix("fn "))
        .filter_map(|rest| rest.split_once('(').map(|(name, _)| name))
        .filter(|n| n.starts_with("cu") && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .map(str::to_string)
        .collect();
    v.sort();
    v.dedup();
    v
}

/// The C source of the stub driver: each symbol a function returning
/// `CUDA_ERROR_NO_DEVICE`.
pub fn stub_source(symbols: &[String]) -> String {
    let mut s = String::from(
        "/* Link-only stub of libcuda.so.1 written by `cargo xtask cuda-check --install`.\n   \
         Every function returns CUDA_ERROR_NO_DEVICE; the GPU machine's driver replaces it. */\n",
    );
    for name in symbols {
        s.push_str(&format!("int {name}(void) {{ return {STUB_RESULT}; }}\n"));
    }
    s
}

/// Compiles the stub driver into `dir/libcuda.so` (soname `libcuda.so.1`) with `cc`.
pub fn build_stub(dir: &Path) -> Result<PathBuf> {
    let syms = cudarc_driver_symbols()?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let c = dir.join("libcuda_stub.c");
    std::fs::write(&c, stub_source(&syms)).with_context(|| format!("writing {}", c.display()))?;
    let so = dir.join("libcuda.so");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    sh(
        Command::new(&cc)
            .args(["-shared", "-fPIC", "-O0", "-Wl,-soname,libcuda.so.1", "-o"])
            .arg(&so)
            .arg(&c),
        &format!("{cc}: stub libcuda.so ({} cu* symbols)", syms.len()),
    )?;
    Ok(so)
}

/// Installs Debian bookworm's `nvidia-cuda-toolkit` (CUDA 11.8) with apt,
/// adding `contrib` + `non-free` on the machine's own mirror (root only).
pub fn install_debian() -> Result<()> {
    let entry = non_free_sources()?;
    if std::fs::read_to_string(SOURCES_FILE).ok().as_deref() != Some(entry.as_str()) {
        std::fs::write(SOURCES_FILE, &entry)
            .with_context(|| format!("writing {SOURCES_FILE} (run as root to --install)"))?;
        eprintln!("wrote {SOURCES_FILE}:\n{entry}");
    }
    sh(Command::new("apt-get").arg("update"), "apt-get update")?;
    // Without recommends: the driver's kernel module (dkms) is not wanted here;
    // libcuda1 comes in as a dependency (needs contrib's nvidia-support).
    sh(
        Command::new("apt-get")
            .args([
                "install",
                "-y",
                "--no-install-recommends",
                "nvidia-cuda-toolkit",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "apt-get install nvidia-cuda-toolkit",
    )
}

const SOURCES_FILE: &str = "/etc/apt/sources.list.d/kiln-non-free.sources";

/// An apt sources entry for bookworm's contrib + non-free, on the mirror of the
/// machine's own Debian entry.
fn non_free_sources() -> Result<String> {
    let mut uri = None;
    let mut signed = None;
    for e in std::fs::read_dir("/etc/apt/sources.list.d")? {
        let p = e?.path();
        if p.extension().is_none_or(|x| x != "sources") || p == Path::new(SOURCES_FILE) {
            continue;
        }
        let text = std::fs::read_to_string(&p)?;
        for stanza in text.split("\n\n") {
            let field = |k: &str| {
                stanza
                    .lines()
                    .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string()))
            };
            let (Some(u), Some(s)) = (field("URIs:"), field("Suites:")) else {
                continue;
            };
            if s.split_whitespace().any(|x| x == "bookworm") && uri.is_none() {
                uri = Some(u);
                signed = field("Signed-By:");
            }
        }
    }
    let Some(uri) = uri else {
        bail!("no bookworm entry in /etc/apt/sources.list.d/*.sources to take the mirror from")
    };
    let mut s = format!(
        "Types: deb\nURIs: {uri}\nSuites: bookworm bookworm-updates\nComponents: contrib non-free\n"
    );
    if let Some(k) = signed {
        s.push_str(&format!("Signed-By: {k}\n"));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_builds_go_to_their_own_target_folder() {
        let c = cuda_cargo(None);
        let dir = c
            .get_envs()
            .find(|(k, _)| *k == "CARGO_TARGET_DIR")
            .and_then(|(_, v)| v)
            .map(PathBuf::from);
        assert_eq!(dir, Some(workspace_root().join("target/cuda")));
        assert_ne!(cuda_target_dir(), workspace_root().join("target"));
        assert_eq!(c.get_current_dir(), Some(workspace_root().as_path()));
    }

    #[test]
    fn driver_symbols_are_the_extern_declarations_once_each() {
        let src = "pub unsafe fn cuInit(Flags: u32) -> CUresult {\n    \
                   #[cfg(not(feature = \"dynamic-loading\"))]\n    {\n        extern \"C\" {\n            \
                   fn cuInit(Flags: u32) -> CUresult;\n            fn cuMemAlloc_v2(p: *mut u64, n: usize) -> CUresult;\n        }\n    \
                   }\n        type _F = unsafe extern \"C\" fn(u32) -> CUresult;\n            fn cuInit(Flags: u32) -> CUresult;\n}\n";
        assert_eq!(driver_symbols_in(src), vec!["cuInit", "cuMemAlloc_v2"]);
        let c = stub_source(&driver_symbols_in(src));
        assert!(c.contains("int cuMemAlloc_v2(void) { return 100; }"));
    }

    #[test]
    fn pins_name_the_cuda_release_and_exports_quote_odd_paths() {
        assert!(PYPI_WHEELS
            .iter()
            .filter(|w| !w.starts_with("nvidia-curand"))
            .all(|w| w.ends_with(&format!("=={PYPI_CUDA}.*"))));
        assert_eq!(shell_quote("/a/b:c"), "/a/b:c");
        assert_eq!(shell_quote("/a b/it's"), "'/a b/it'\\''s'");
        let t = Toolkit {
            root: PathBuf::from("/x/root"),
        };
        assert!(t.exports().starts_with("export CUDA_ROOT=/x/root\n"));
        assert_eq!(Source::Pypi.default_compute_cap(), "90");
    }
}
