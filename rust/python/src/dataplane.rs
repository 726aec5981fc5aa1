//! The data plane for Python: `open_tun` and `Pump` (the threads run in Rust, without the GIL).

use std::io;
use std::os::fd::IntoRawFd;

use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyDict;
use simpletun_core::esp::DEFAULT_REPLAY_WINDOW;
use simpletun_core::frame::MAX_FRAME;
use simpletun_core::pump::{Crypto, Pump, PumpConfig};
use simpletun_core::tun::{self, Kind};
use simpletun_core::SecurityAssociation;

use crate::errors;

/// `(spi, enc_key, auth_key)` of one SA.
type SaParams = (u32, PyBackedBytes, PyBackedBytes);

fn kind(tap: bool) -> Kind {
    if tap {
        Kind::Tap
    } else {
        Kind::Tun
    }
}

/// Bad arguments are the caller's configuration; anything else comes from the OS.
fn start_error(e: io::Error) -> PyErr {
    match e.kind() {
        io::ErrorKind::InvalidInput => errors::config_error(e.to_string()),
        _ => e.into(),
    }
}

/// Open (creating if needed) a TUN or TAP device. Returns `(fd, actual_name, created)`; the
/// non-blocking descriptor now belongs to the caller (a created, non-persistent device
/// disappears when it is closed). Every failure, a bad name included, is a `DeviceError`.
#[pyfunction]
#[pyo3(signature = (name, tap=false))]
fn open_tun(py: Python<'_>, name: &str, tap: bool) -> PyResult<(i32, String, bool)> {
    let t = py
        .detach(|| tun::open(name, kind(tap)))
        .map_err(|e| errors::device_error(e.to_string()))?;
    let (actual, created) = (t.name().to_owned(), t.created());
    Ok((t.into_raw_fd(), actual, created))
}

/// The data plane between a TUN/TAP descriptor and a connected TCP socket. Starts its threads
/// at once; never closes the descriptors (keep them open until the pump has ended).
#[pyclass(module = "simpletun._core", name = "Pump", frozen)]
pub struct PyPump {
    pump: Pump,
}

fn new_sa(p: &SaParams, replay_window: u32, esn: bool) -> PyResult<SecurityAssociation> {
    SecurityAssociation::new(p.0, &p.1, &p.2, replay_window, esn).map_err(errors::sa_config_error)
}

#[pymethods]
impl PyPump {
    #[new]
    #[pyo3(signature = (
        tun_fd, sock_fd, *, tap=false, tx=None, rx=None,
        replay_window=DEFAULT_REPLAY_WINDOW, esn=false, max_frame=MAX_FRAME,
    ))]
    #[allow(clippy::too_many_arguments)] // the Python keyword arguments
    fn new(
        py: Python<'_>,
        tun_fd: i32,
        sock_fd: i32,
        tap: bool,
        tx: Option<SaParams>,
        rx: Option<SaParams>,
        replay_window: u32,
        esn: bool,
        max_frame: usize,
    ) -> PyResult<Self> {
        let crypto = match (tx, rx) {
            (None, None) => Crypto::Plaintext,
            (Some(tx), Some(rx)) => Crypto::Esp {
                tx: new_sa(&tx, replay_window, esn)?,
                rx: new_sa(&rx, replay_window, esn)?,
            },
            _ => {
                return Err(errors::config_error(
                    "give both tx and rx (ESP) or neither (plaintext), not just one",
                ))
            }
        };
        let config = PumpConfig {
            kind: kind(tap),
            crypto,
            max_frame,
        };
        let pump = py
            .detach(|| Pump::start(tun_fd, sock_fd, config))
            .map_err(start_error)?;
        Ok(PyPump { pump })
    }

    /// Stop both threads and wait for them (about a millisecond); idempotent.
    fn stop(&self, py: Python<'_>) {
        py.detach(|| self.pump.stop());
    }

    /// An eventfd that becomes readable once the pump has ended (peer closed, error, stop).
    #[getter]
    fn done_fd(&self) -> i32 {
        self.pump.done_fd()
    }

    #[getter]
    fn running(&self) -> bool {
        self.pump.running()
    }

    /// Why the pump ended, or None while it runs.
    #[getter]
    fn exit_reason(&self) -> Option<String> {
        self.pump.exit().map(|e| e.to_string())
    }

    /// Traffic counters and one `drop_<reason>` counter per drop reason.
    #[getter]
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in self.pump.stats().entries() {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    fn __repr__(&self) -> String {
        match self.pump.exit() {
            None => "<Pump running>".to_owned(),
            Some(e) => format!("<Pump ended: {e}>"),
        }
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(open_tun, m)?)?;
    m.add_class::<PyPump>()?;
    Ok(())
}
