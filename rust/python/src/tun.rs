//! `open_tun` for Python: open (or create) a TUN/TAP device; the data plane takes its fd.

use std::os::fd::IntoRawFd;

use pyo3::prelude::*;
use simpletun_core::tun::{self, Kind};

use crate::errors;

/// Open (creating if needed) a TUN or TAP device. Returns `(fd, actual_name, created)`; the
/// non-blocking descriptor now belongs to the caller (a created, non-persistent device
/// disappears when it is closed). Every failure, a bad name included, is a `DeviceError`.
#[pyfunction]
#[pyo3(signature = (name, tap=false))]
fn open_tun(py: Python<'_>, name: &str, tap: bool) -> PyResult<(i32, String, bool)> {
    let kind = if tap { Kind::Tap } else { Kind::Tun };
    let t = py
        .detach(|| tun::open(name, kind))
        .map_err(|e| errors::device_error(e.to_string()))?;
    let (actual, created) = (t.name().to_owned(), t.created());
    Ok((t.into_raw_fd(), actual, created))
}

/// Open (creating if needed) a TUN device with `IFF_VNET_HDR` and the offloads the kernel
/// accepts: `(fd, actual_name, created, offloads)`, offloads naming what was accepted
/// ("csum+tso+uso", "csum+tso", ..., "none"). The data plane started on this descriptor splits
/// and coalesces super-packets; nothing else may read or write it (every packet carries a
/// vnet header).
#[pyfunction]
fn open_tun_offload(py: Python<'_>, name: &str) -> PyResult<(i32, String, bool, String)> {
    let t = py
        .detach(|| tun::open_offload(name, Kind::Tun))
        .map_err(|e| errors::device_error(e.to_string()))?;
    let (actual, created) = (t.name().to_owned(), t.created());
    let offloads = t.offloads().unwrap_or_default().to_string();
    Ok((t.into_raw_fd(), actual, created, offloads))
}

/// Open (creating if needed) a multi-queue (`IFF_MULTI_QUEUE`) TUN or TAP device with
/// `queues` queues: `(fds, actual_name, created, offloads)`, one descriptor per queue in
/// queue order (all now the caller's; the device goes when the last is closed). `offload`
/// (TUN only): vnet headers and offloads as `open_tun_offload` (`offloads` names them; `None`
/// without `offload`). `queues=1` opens the plain single-queue device.
#[pyfunction]
#[pyo3(signature = (name, queues, *, tap=false, offload=false))]
fn open_tun_queues(
    py: Python<'_>,
    name: &str,
    queues: usize,
    tap: bool,
    offload: bool,
) -> PyResult<(Vec<i32>, String, bool, Option<String>)> {
    let kind = if tap { Kind::Tap } else { Kind::Tun };
    let ts = py
        .detach(|| tun::open_queues(name, kind, offload, queues))
        .map_err(|e| errors::device_error(e.to_string()))?;
    let (actual, created) = (ts[0].name().to_owned(), ts[0].created());
    let offloads = ts[0].offloads().map(|o| o.to_string());
    let fds = ts.into_iter().map(|t| t.into_raw_fd()).collect();
    Ok((fds, actual, created, offloads))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(open_tun, m)?)?;
    m.add_function(wrap_pyfunction!(open_tun_offload, m)?)?;
    m.add_function(wrap_pyfunction!(open_tun_queues, m)?)
}
