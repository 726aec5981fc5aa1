//! `SecurityAssociation`: one ESP SA, exposed to Python.

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use simpletun_core::esp::{self, SecurityAssociation};

use crate::errors;

/// Packets above this size are processed with the GIL released.
const DETACH_THRESHOLD: usize = 4096;

#[pyclass(module = "simpletun._core", name = "SecurityAssociation")]
pub struct PySa {
    sa: SecurityAssociation,
}

#[pymethods]
impl PySa {
    #[new]
    #[pyo3(signature = (spi, enc_key, auth_key, replay_window=esp::DEFAULT_REPLAY_WINDOW as i128, esn=false))]
    fn new(
        spi: i128,
        enc_key: &[u8],
        auth_key: &[u8],
        replay_window: i128,
        esn: bool,
    ) -> PyResult<Self> {
        let spi = u32::try_from(spi).map_err(|_| {
            errors::config_error(format!("SPI {spi} is out of range; use 256 to 4294967295"))
        })?;
        // Out of u32 range is out of the window range too; let the core word the error.
        let replay_window = u32::try_from(replay_window).unwrap_or(u32::MAX);
        SecurityAssociation::new(spi, enc_key, auth_key, replay_window, esn)
            .map(|sa| PySa { sa })
            .map_err(errors::sa_config_error)
    }

    /// Encapsulate an inner packet; returns SPI | seq | IV | ciphertext | ICV.
    #[pyo3(signature = (inner, next_header=None))]
    fn encap<'py>(
        &mut self,
        py: Python<'py>,
        inner: &[u8],
        next_header: Option<i128>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let nh = match next_header {
            Some(nh) => u8::try_from(nh).map_err(|_| {
                errors::config_error(format!("next_header must be 0-255, got {nh}"))
            })?,
            None => esp::infer_next_header(inner)
                .ok_or_else(|| errors::encap_error(esp::EncapError::UnknownNextHeader))?,
        };
        let n = inner.len();
        let sa = &mut self.sa;
        PyBytes::new_with(py, esp::encap_len(n), |buf| {
            buf[esp::PAYLOAD_OFFSET..esp::PAYLOAD_OFFSET + n].copy_from_slice(inner);
            let r = if n >= DETACH_THRESHOLD {
                py.detach(|| sa.encap_in_place(buf, n, nh))
            } else {
                sa.encap_in_place(buf, n, nh)
            };
            r.map(|_| ()).map_err(errors::encap_error)
        })
    }

    /// Decapsulate an ESP packet; returns (next_header, inner).
    fn decap<'py>(&mut self, py: Python<'py>, esp: &[u8]) -> PyResult<(u8, Bound<'py, PyBytes>)> {
        let mut buf = esp.to_vec();
        let sa = &mut self.sa;
        let r = if buf.len() >= DETACH_THRESHOLD {
            py.detach(|| sa.decap_in_place(&mut buf))
        } else {
            sa.decap_in_place(&mut buf)
        };
        let d = r.map_err(errors::drop_error)?;
        Ok((d.next_header, PyBytes::new(py, &buf[d.inner])))
    }

    /// Packet/byte counters and one `drop_<reason>` counter per drop reason.
    #[getter]
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.sa.stats();
        let d = PyDict::new(py);
        d.set_item("encap_packets", s.encap_packets)?;
        d.set_item("encap_bytes", s.encap_bytes)?;
        d.set_item("decap_packets", s.decap_packets)?;
        d.set_item("decap_bytes", s.decap_bytes)?;
        for (name, n) in s.drops.iter() {
            d.set_item(format!("drop_{name}"), n)?;
        }
        Ok(d)
    }

    #[getter]
    fn spi(&self) -> u32 {
        self.sa.spi()
    }
    #[getter]
    fn esn(&self) -> bool {
        self.sa.esn()
    }
    #[getter]
    fn replay_window(&self) -> u32 {
        self.sa.replay_window()
    }
    #[getter]
    fn enc_key_bits(&self) -> u32 {
        self.sa.enc_key_bits()
    }
    /// Last sequence number sent (0 before the first packet).
    #[getter]
    fn tx_seq(&self) -> u64 {
        self.sa.tx_seq()
    }
    /// Highest sequence number received and authenticated (0 before the first).
    #[getter]
    fn rx_highest_seq(&self) -> u64 {
        self.sa.rx_highest_seq()
    }

    /// Testing aid: make the next packet use `last + 1`. Only moves forward.
    fn _skip_tx_seq_to(&mut self, last: u64) -> PyResult<()> {
        if self.sa.skip_tx_seq_to(last) {
            Ok(())
        } else {
            Err(errors::config_error(format!(
                "the outbound sequence number can only move forward (now {}, asked {last})",
                self.sa.tx_seq()
            )))
        }
    }

    /// Testing/manual-keying aid: the inbound window starts after `last` (nothing received
    /// yet).
    fn _skip_rx_seq_to(&mut self, last: u64) -> PyResult<()> {
        if self.sa.skip_rx_seq_to(last) {
            Ok(())
        } else {
            Err(errors::config_error(format!(
                "the inbound window can only be preset before the first packet and below the \
                 sequence-number limit (asked {last})"
            )))
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "SecurityAssociation(spi={:#010x}, aes={}, esn={}, replay_window={}, tx_seq={})",
            self.sa.spi(),
            self.sa.enc_key_bits(),
            self.sa.esn(),
            self.sa.replay_window(),
            self.sa.tx_seq()
        )
    }
}
