//! Length-prefixed framing, exposed to Python.

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};
use simpletun_core::frame::{self, FrameDecoder};

use crate::errors;

/// `2-byte big-endian length | payload`.
#[pyfunction]
pub fn encode_frame<'py>(py: Python<'py>, payload: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
    PyBytes::new_with(py, frame::PREFIX_LEN + payload.len(), |buf| {
        frame::write_prefix(buf, payload.len()).map_err(|e| errors::frame_error(&e))?;
        buf[frame::PREFIX_LEN..].copy_from_slice(payload);
        Ok(())
    })
}

/// Streaming decoder: feed it any split of the stream, get back whole frames.
#[pyclass(module = "simpletun._core", name = "FrameDecoder")]
pub struct PyFrameDecoder {
    dec: FrameDecoder,
}

#[pymethods]
impl PyFrameDecoder {
    #[new]
    #[pyo3(signature = (max_frame=frame::MAX_FRAME))]
    fn new(max_frame: usize) -> PyResult<Self> {
        if max_frame == 0 || max_frame > frame::MAX_FRAME {
            return Err(errors::config_error(format!(
                "max_frame must be 1-{}, got {max_frame}",
                frame::MAX_FRAME
            )));
        }
        Ok(PyFrameDecoder {
            dec: FrameDecoder::new(max_frame),
        })
    }

    /// Returns the frames completed by `chunk`. An oversized frame raises FrameTooLargeError
    /// (after the whole chunk is processed) whose `frames` attribute holds the good frames.
    fn feed<'py>(&mut self, py: Python<'py>, chunk: &[u8]) -> PyResult<Bound<'py, PyList>> {
        let frames = PyList::empty(py);
        let mut first_err = None;
        let mut push_err = None;
        self.dec.feed(chunk, |r| match r {
            Ok(f) => {
                if let Err(e) = frames.append(PyBytes::new(py, f)) {
                    push_err.get_or_insert(e);
                }
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        });
        if let Some(e) = push_err {
            return Err(e);
        }
        match first_err {
            None => Ok(frames),
            Some(e) => {
                let err = errors::frame_error(&e);
                err.value(py).setattr("frames", frames)?;
                Err(err)
            }
        }
    }

    /// Bytes held back waiting for the rest of a frame (at most max_frame + 2).
    #[getter]
    fn buffered(&self) -> usize {
        self.dec.buffered()
    }

    #[getter]
    fn max_frame(&self) -> usize {
        self.dec.max_frame()
    }
}
