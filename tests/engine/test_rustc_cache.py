"""The rustc cache shared by Rust engines (engine/src/rustc_cache.rs), driven
by real cargo builds: two crate directories with the same cell compile once;
an `env!` value that differs between them is compiled separately; a compile
error is replayed with the second directory's paths."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("PARALLAX_BIN") or REPO / "target/release/parallax").resolve()

pytestmark = pytest.mark.timeout(300)


def make_crate(root: Path, name: str, source: str) -> Path:
    d = root / name
    (d / "src").mkdir(parents=True)
    # evcxr's cell crate is called ctx; only it (and registry crates) are cached
    (d / "Cargo.toml").write_text('[package]\nname = "ctx"\nversion = "1.0.0"\nedition = "2021"\n')
    (d / "src" / "main.rs").write_text(source)
    return d


def build(crate: Path, cache: Path, log: Path, **env) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.update(
        RUSTC_WRAPPER=str(BIN),
        PARALLAX_RUSTC_CACHE=str(cache),
        PARALLAX_RUSTC_CACHE_LOG=str(log),
        CARGO_TARGET_DIR=str(crate / "target"),
        **env,
    )
    return subprocess.run(
        ["cargo", "build", "--offline", "--message-format=short"],
        cwd=crate, env=e, capture_output=True, text=True, timeout=240,
    )


def outcomes(log: Path) -> list[str]:
    return [line.split()[2] for line in log.read_text().splitlines() if line.split()[1] == "ctx"]


def test_second_crate_dir_reuses_the_first_compile(tmp_path):
    src = 'fn main() { println!("{}", 6 * 7); }\n'
    cache, log = tmp_path / "cache", tmp_path / "log"
    a, b = make_crate(tmp_path, "a", src), make_crate(tmp_path, "b", src)
    assert build(a, cache, log).returncode == 0
    assert build(b, cache, log).returncode == 0
    assert outcomes(log) == ["Ok(Compiled)", "Ok(Hit)"]
    for d in (a, b):
        out = subprocess.run([d / "target/debug/ctx"], capture_output=True, text=True, timeout=30)
        assert out.stdout == "42\n"
    # the dep-info cargo keeps names b's own source, not a's
    dep = (b / "target/debug/deps").glob("ctx-*.d")
    assert all(str(a) not in p.read_text() for p in dep)


def test_env_dependency_that_differs_is_compiled_again(tmp_path):
    src = 'fn main() { println!("{}", env!("PARALLAX_TEST_RANK")); }\n'
    cache, log = tmp_path / "cache", tmp_path / "log"
    a, b = make_crate(tmp_path, "a", src), make_crate(tmp_path, "b", src)
    assert build(a, cache, log, PARALLAX_TEST_RANK="0").returncode == 0
    assert build(b, cache, log, PARALLAX_TEST_RANK="1").returncode == 0
    assert outcomes(log) == ["Ok(Compiled)", "Ok(Differs)"]
    out = subprocess.run([b / "target/debug/ctx"], capture_output=True, text=True, timeout=30)
    assert out.stdout == "1\n"


def test_compile_error_is_replayed_once_computed(tmp_path):
    src = "fn main() { let x: i32 = \"no\"; }\n"
    cache, log = tmp_path / "cache", tmp_path / "log"
    a, b = make_crate(tmp_path, "a", src), make_crate(tmp_path, "b", src)
    ra, rb = build(a, cache, log), build(b, cache, log)
    assert ra.returncode != 0 and rb.returncode != 0
    assert outcomes(log) == ["Ok(Compiled)", "Ok(Hit)"]
    assert "E0308" in rb.stderr
    assert str(a) not in rb.stderr


def test_cache_off_runs_rustc_unchanged(tmp_path):
    a = make_crate(tmp_path, "a", "fn main() {}\n")
    log = tmp_path / "log"
    r = build(a, Path("off"), log)
    assert r.returncode == 0, r.stderr
    assert not log.exists()


STORE = """pub struct Store;
impl Store {
    pub fn take_variable<T: Default>(&mut self, _n: &str) -> T { T::default() }
    pub fn put_variable<T>(&mut self, _n: &str, _v: T) {}
}
pub fn run(evcxr_variable_store: &mut Store) {
"""


def make_lib(root: Path, name: str, order: list[str], body: str) -> Path:
    """A cell crate shaped like evcxr's: its variable statements in `order`."""
    d = make_crate(root, name, "")
    (d / "src" / "main.rs").unlink()
    loads = "".join(
        f"let mut {v} = evcxr_variable_store.take_variable::<i32>(stringify!({v}));\n" for v in order
    )
    stores = "".join(
        f"evcxr_variable_store.put_variable::<i32>(stringify!({v}), {v});\n" for v in order
    )
    (d / "src" / "lib.rs").write_text(STORE + loads + body + stores + "}\n")
    return d


def test_variable_statements_in_another_order_share_the_build(tmp_path):
    """evcxr orders these statements by a per-process HashMap."""
    cache, log = tmp_path / "cache", tmp_path / "log"
    a = make_lib(tmp_path, "a", ["x", "y"], "x += y;\n")
    b = make_lib(tmp_path, "b", ["y", "x"], "x += y;\n")
    assert build(a, cache, log).returncode == 0
    assert build(b, cache, log).returncode == 0
    assert outcomes(log) == ["Ok(Compiled)", "Ok(Hit)"]


def test_diagnostics_are_shared_only_if_they_point_at_equal_lines(tmp_path):
    cache, log = tmp_path / "cache", tmp_path / "log"
    # the error is in the cell's own line, which both orders have in place
    a = make_lib(tmp_path, "a", ["x", "y"], "x += nope;\n")
    b = make_lib(tmp_path, "b", ["y", "x"], "x += nope;\n")
    ra, rb = build(a, cache, log), build(b, cache, log)
    assert ra.returncode != 0 and rb.returncode != 0 and "E0425" in rb.stderr
    assert outcomes(log) == ["Ok(Compiled)", "Ok(Hit)"]
    # an error on a variable line, which the orders put on different lines
    log2 = tmp_path / "log2"
    c = make_lib(tmp_path, "c", ["x", "q"], "x += 1;\n")
    d = make_lib(tmp_path, "d", ["q", "x"], "x += 1;\n")
    for crate in (c, d):
        lib = crate / "src" / "lib.rs"
        lib.write_text(lib.read_text().replace("take_variable::<i32>(stringify!(q))", "take_variable::<Missing>(stringify!(q))"))
    rc_, rd = build(c, cache, log2), build(d, cache, log2)
    assert rc_.returncode != 0 and rd.returncode != 0
    assert outcomes(log2) == ["Ok(Compiled)", "Ok(Differs)"]
