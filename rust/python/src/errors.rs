//! The one place where Rust errors become Python exceptions. The exception classes are defined
//! in Python (`simpletun/_errors.py`); this module looks them up by name.

use pyo3::prelude::*;
use pyo3::types::PyType;
use simpletun_core::esp::{EncapError, SaConfigError};
use simpletun_core::frame::FrameError;
use simpletun_core::DropReason;

/// An instance of `simpletun._errors.<class_name>(msg)`.
pub fn new_error(py: Python<'_>, class_name: &str, msg: impl Into<String>) -> PyErr {
    let msg = msg.into();
    let lookup = || -> PyResult<Bound<'_, PyType>> {
        let cls = py.import("simpletun._errors")?.getattr(class_name)?;
        Ok(cls.cast_into::<PyType>()?)
    };
    match lookup() {
        Ok(cls) => PyErr::from_type(cls, msg),
        Err(e) => e,
    }
}

fn raise(class_name: &'static str, msg: String) -> PyErr {
    Python::attach(|py| new_error(py, class_name, msg))
}

/// Bad user input (flags, keys, configuration): `ConfigError`.
pub fn config_error(msg: impl Into<String>) -> PyErr {
    raise("ConfigError", msg.into())
}

/// A TUN/TAP device could not be opened or configured: `DeviceError`.
pub fn device_error(msg: impl Into<String>) -> PyErr {
    raise("DeviceError", msg.into())
}

pub fn sa_config_error(e: SaConfigError) -> PyErr {
    config_error(e.to_string())
}

pub fn encap_error(e: EncapError) -> PyErr {
    match e {
        EncapError::SeqExhausted { .. } => raise("SequenceExhaustedError", e.to_string()),
        EncapError::UnknownNextHeader => raise("MalformedPacketError", e.to_string()),
        EncapError::BufferTooSmall { .. } => raise("EspError", e.to_string()),
    }
}

/// A dropped inbound ESP packet, as the exception for its reason.
pub fn drop_error(reason: DropReason) -> PyErr {
    let class = match reason {
        DropReason::Auth => "AuthenticationError",
        DropReason::Replay => "ReplayError",
        DropReason::UnknownSpi => "UnknownSpiError",
        DropReason::SeqExhausted => "SequenceExhaustedError",
        DropReason::BadLength
        | DropReason::BadPadding
        | DropReason::BadInner
        | DropReason::Oversize
        | DropReason::Control
        | DropReason::DeviceWrite => "MalformedPacketError",
    };
    raise(class, reason.to_string())
}

pub fn frame_error(e: &FrameError) -> PyErr {
    let class = match e {
        FrameError::TooLarge { .. } => "FrameTooLargeError",
        FrameError::PayloadTooLarge { .. } => "FrameError",
    };
    raise(class, e.to_string())
}
