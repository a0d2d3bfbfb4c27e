//! The typed values of recipe fields that name a choice: parsed once, when the recipe is read
//! (or a `--device` flag is), and written back as the same strings in `plan.toml`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// `train.precision`: where matmuls and attention compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Precision {
    #[serde(rename = "f32")]
    F32,
    #[serde(rename = "bf16-mixed")]
    Bf16Mixed,
    #[serde(rename = "f16-mixed")]
    F16Mixed,
}

impl Precision {
    pub const ALL: [Precision; 3] = [Precision::F32, Precision::Bf16Mixed, Precision::F16Mixed];

    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16Mixed => "bf16-mixed",
            Precision::F16Mixed => "f16-mixed",
        }
    }

    /// Whether matmuls run in a half type (master weights stay f32).
    pub fn is_half(self) -> bool {
        self != Precision::F32
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `energy.meter`: how joules are measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Meter {
    /// NVML for GPUs when present, plus RAPL where readable, else the estimate.
    Auto,
    Nvml,
    Rapl,
    Estimate,
}

impl Meter {
    pub fn as_str(self) -> &'static str {
        match self {
            Meter::Auto => "auto",
            Meter::Nvml => "nvml",
            Meter::Rapl => "rapl",
            Meter::Estimate => "estimate",
        }
    }
}

/// `train.device` and `--device`: which backend, and which device of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    /// CUDA, else a hardware wgpu adapter, else the CPU.
    Auto,
    /// The CPU through Burn's flex backend (`cpu` or `flex`).
    Cpu,
    NdArray,
    Wgpu(Option<usize>),
    Cuda(Option<usize>),
}

pub const DEVICE_HINT: &str = "one of auto, cpu, flex, ndarray, wgpu[:N], cuda[:N]";

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, index) = match s.split_once(':') {
            Some((n, i)) => {
                // Digits only: `usize::from_str` would also take `+1`.
                let i = Some(i).filter(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit())).and_then(|i| i.parse().ok());
                (n, Some(i.ok_or_else(|| format!("unknown device '{s}': the index after ':' must be a number\n  hint: {DEVICE_HINT}"))?))
            }
            None => (s, None),
        };
        Ok(match (name, index) {
            ("auto", None) => DeviceSpec::Auto,
            ("cpu" | "flex", None) => DeviceSpec::Cpu,
            ("ndarray", None) => DeviceSpec::NdArray,
            ("wgpu", i) => DeviceSpec::Wgpu(i),
            ("cuda", i) => DeviceSpec::Cuda(i),
            _ => return Err(format!("unknown device '{s}'; expected {DEVICE_HINT}")),
        })
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::NdArray => f.write_str("ndarray"),
            DeviceSpec::Wgpu(None) => f.write_str("wgpu"),
            DeviceSpec::Cuda(None) => f.write_str("cuda"),
            DeviceSpec::Wgpu(Some(i)) => write!(f, "wgpu:{i}"),
            DeviceSpec::Cuda(Some(i)) => write!(f, "cuda:{i}"),
        }
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        d.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs_round_trip() {
        for s in ["auto", "cpu", "ndarray", "wgpu", "wgpu:1", "cuda", "cuda:0"] {
            assert_eq!(s.parse::<DeviceSpec>().unwrap().to_string(), s);
        }
        assert_eq!("flex".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        for bad in ["gpu", "cuda:+1", "cuda:", "cpu:0", "wgpu:x", "cuda:1:2"] {
            assert!(bad.parse::<DeviceSpec>().is_err(), "{bad}");
        }
    }
}
