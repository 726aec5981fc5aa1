//! `simpletun._core`: thin PyO3 bindings over `simpletun-core`. Arguments are extracted here,
//! the GIL is released for blocking or long work, and results are converted; all logic lives in
//! the core crate. Errors become Python exceptions in one place, `errors.rs`.

use pyo3::prelude::*;
use pyo3::types::PyTuple;
use simpletun_core::{esp, DropReason};

mod dp;
mod errors;
mod frame;
mod sa;
mod tun;

/// Total ESP packet length for an inner packet of `inner_len` bytes.
#[pyfunction]
fn esp_encap_len(inner_len: usize) -> usize {
    esp::encap_len(inner_len)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<sa::PySa>()?;
    m.add_class::<frame::PyFrameDecoder>()?;
    m.add_function(wrap_pyfunction!(frame::encode_frame, m)?)?;
    m.add_function(wrap_pyfunction!(esp_encap_len, m)?)?;
    m.add("ESP_MAX_OVERHEAD", esp::MAX_OVERHEAD)?;
    let names: Vec<&str> = DropReason::ALL.iter().map(|r| r.name()).collect();
    m.add("DROP_REASONS", PyTuple::new(m.py(), names)?)?;
    dp::register(m)?;
    tun::register(m)?;
    Ok(())
}
