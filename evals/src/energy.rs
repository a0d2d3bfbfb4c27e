//! Energy meters. Every figure says how it was obtained:
//! - `counter`: a hardware energy counter (RAPL under `/sys/class/powercap`, NVML's total-energy counter);
//! - `polled`: power readings integrated over time;
//! - `estimate`: process CPU time × watts per busy core (+ an optional constant), used only where
//!   no counter can be read.
//!
//! The estimate's default of 12 W per busy core is the per-core power the Green Algorithms
//! calculator (Lannelongue, Grealey & Inouye, Advanced Science 2021) uses for an unspecified CPU.
//! The default grid intensity, 475 gCO2e/kWh, is the world average that calculator uses (IEA).

use std::path::{Path, PathBuf};
use std::time::Instant;

use kiln_recipes::Meter;
use serde::{Deserialize, Serialize};

pub const DEFAULT_WATTS_PER_CORE: f64 = 12.0;
pub const DEFAULT_GRID_GCO2_PER_KWH: f64 = 475.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Counter,
    Polled,
    Estimate,
}

impl Method {
    pub fn as_str(&self) -> &'static str {
        match self {
            Method::Counter => "counter",
            Method::Polled => "polled",
            Method::Estimate => "estimate",
        }
    }
}

/// One meter's share of a run's energy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Component {
    pub meter: String,
    pub method: Method,
    /// What it covers: `cpu-package`, `gpu`, `process-cpu-estimate`.
    pub coverage: String,
    pub joules: f64,
}

pub trait EnergyMeter: Send {
    fn name(&self) -> &str;
    fn method(&self) -> Method;
    fn coverage(&self) -> &str;
    /// Joules since the meter was created. An error is never reported as 0 J.
    fn joules(&mut self) -> Result<f64, String>;
}

/// RAPL package counters: every top-level `*-rapl:N` zone (sub-zones such as `:0:0` are parts of
/// a package and would double count). Wraparound is handled with `max_energy_range_uj`.
pub struct Rapl {
    zones: Vec<Zone>,
    total_uj: f64,
}

struct Zone {
    energy: PathBuf,
    max_uj: u64,
    last_uj: u64,
}

fn read_u64(p: &Path) -> Result<u64, String> {
    let s = std::fs::read_to_string(p).map_err(|e| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            format!("{}: permission denied; fix: sudo chmod a+r /sys/class/powercap/*/energy_uj (or run as root)", p.display())
        } else {
            format!("{}: {e}", p.display())
        }
    })?;
    s.trim().parse().map_err(|_| format!("{}: not a number: '{}'", p.display(), s.trim()))
}

impl Rapl {
    /// Opens every readable package zone under `root` (normally `/sys/class/powercap`).
    /// Unreadable zones produce warnings; no readable zone at all is an error.
    pub fn open(root: &Path) -> Result<(Self, Vec<String>), String> {
        let mut warnings = Vec::new();
        let rd = std::fs::read_dir(root).map_err(|e| format!("{}: {e}", root.display()))?;
        let mut names: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let n = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
                n.contains("-rapl:") && n.matches(':').count() == 1
            })
            .collect();
        names.sort();
        let mut zones = Vec::new();
        for z in names {
            let energy = z.join("energy_uj");
            match (read_u64(&energy), read_u64(&z.join("max_energy_range_uj"))) {
                (Ok(last_uj), Ok(max_uj)) => zones.push(Zone { energy, max_uj, last_uj }),
                (Err(e), _) | (_, Err(e)) => warnings.push(e),
            }
        }
        if zones.is_empty() {
            return Err(format!("no readable RAPL package zone under {}{}", root.display(),
                warnings.iter().map(|w| format!("\n  {w}")).collect::<String>()));
        }
        Ok((Self { zones, total_uj: 0.0 }, warnings))
    }
}

impl EnergyMeter for Rapl {
    fn name(&self) -> &str {
        "rapl"
    }
    fn method(&self) -> Method {
        Method::Counter
    }
    fn coverage(&self) -> &str {
        "cpu-package"
    }
    fn joules(&mut self) -> Result<f64, String> {
        for z in &mut self.zones {
            let now = read_u64(&z.energy)?;
            let delta = if now >= z.last_uj { now - z.last_uj } else { now + z.max_uj - z.last_uj };
            z.last_uj = now;
            self.total_uj += delta as f64;
        }
        Ok(self.total_uj / 1e6)
    }
}

/// Process CPU time × watts per busy core, plus `idle_watts` × wall time.
pub struct Estimate {
    pub watts_per_core: f64,
    pub idle_watts: f64,
    start_cpu_s: f64,
    start: Instant,
}

/// User + system CPU seconds of this process, all threads.
pub fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct we own.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

impl Estimate {
    pub fn new(watts_per_core: f64, idle_watts: f64) -> Self {
        Self { watts_per_core, idle_watts, start_cpu_s: process_cpu_seconds(), start: Instant::now() }
    }
    /// The estimate for a given CPU time and wall time.
    pub fn joules_for(&self, cpu_s: f64, wall_s: f64) -> f64 {
        cpu_s * self.watts_per_core + wall_s * self.idle_watts
    }
}

impl EnergyMeter for Estimate {
    fn name(&self) -> &str {
        "estimate"
    }
    fn method(&self) -> Method {
        Method::Estimate
    }
    fn coverage(&self) -> &str {
        "process-cpu-estimate"
    }
    fn joules(&mut self) -> Result<f64, String> {
        let cpu = process_cpu_seconds() - self.start_cpu_s;
        Ok(self.joules_for(cpu, self.start.elapsed().as_secs_f64()))
    }
}

/// The memory of NVIDIA GPU `index` (NVML's numbering) in bytes; `None` where NVML cannot tell.
pub fn nvml_total_memory(index: u32) -> Option<u64> {
    let nvml = nvml_wrapper::Nvml::init().ok()?;
    let info = nvml.device_by_index(index).ok()?.memory_info().ok()?;
    Some(info.total)
}

/// NVIDIA GPUs through NVML (libnvidia-ml, loaded at run time: nothing is needed at build time).
/// Uses each GPU's total-energy counter (Volta and later); on GPUs without it, integrates the
/// power reading between reads (`polled`), and says so.
pub struct Nvml {
    nvml: nvml_wrapper::Nvml,
    devices: Vec<(u32, bool)>,
    start_mj: Vec<u64>,
    polled_j: Vec<f64>,
    last: Instant,
    last_w: Vec<f64>,
}

impl Nvml {
    /// Opens every visible GPU. Errors when the library or a GPU is missing.
    pub fn open() -> Result<(Self, Vec<String>), String> {
        let nvml = nvml_wrapper::Nvml::init().map_err(|e| format!("NVML unavailable: {e}"))?;
        let n = nvml.device_count().map_err(|e| format!("NVML: {e}"))?;
        if n == 0 {
            return Err("NVML: no GPU".into());
        }
        let mut devices = Vec::new();
        let mut start_mj = Vec::new();
        let mut notes = Vec::new();
        for i in 0..n {
            let d = nvml.device_by_index(i).map_err(|e| format!("NVML GPU {i}: {e}"))?;
            match d.total_energy_consumption() {
                Ok(mj) => {
                    devices.push((i, true));
                    start_mj.push(mj);
                }
                Err(e) => {
                    notes.push(format!("GPU {i}: no energy counter ({e}); integrating polled power instead"));
                    devices.push((i, false));
                    start_mj.push(0);
                }
            }
        }
        let k = devices.len();
        Ok((Self { nvml, devices, start_mj, polled_j: vec![0.0; k], last: Instant::now(), last_w: vec![0.0; k] }, notes))
    }
}

impl EnergyMeter for Nvml {
    fn name(&self) -> &str {
        "nvml"
    }
    fn method(&self) -> Method {
        if self.devices.iter().all(|d| d.1) { Method::Counter } else { Method::Polled }
    }
    fn coverage(&self) -> &str {
        "gpu"
    }
    fn joules(&mut self) -> Result<f64, String> {
        let dt = self.last.elapsed().as_secs_f64();
        self.last = Instant::now();
        let mut total = 0.0;
        for (k, &(i, counter)) in self.devices.iter().enumerate() {
            let d = self.nvml.device_by_index(i).map_err(|e| format!("NVML GPU {i}: {e}"))?;
            if counter {
                let mj = d.total_energy_consumption().map_err(|e| format!("NVML GPU {i}: {e}"))?;
                total += mj.saturating_sub(self.start_mj[k]) as f64 / 1e3;
            } else {
                let w = d.power_usage().map_err(|e| format!("NVML GPU {i}: {e}"))? as f64 / 1e3;
                self.polled_j[k] += 0.5 * (w + self.last_w[k]) * dt;
                self.last_w[k] = w;
                total += self.polled_j[k];
            }
        }
        Ok(total)
    }
}

/// A GPU that NVML cannot read, estimated at its board power (TDP) for the whole time the meter
/// runs: an upper bound on what the GPU drew, labelled as an estimate.
pub struct GpuTdp {
    pub watts: f64,
    start: Instant,
}

impl GpuTdp {
    pub fn new(watts: f64) -> Self {
        Self { watts, start: Instant::now() }
    }
}

impl EnergyMeter for GpuTdp {
    fn name(&self) -> &str {
        "gpu-tdp-estimate"
    }
    fn method(&self) -> Method {
        Method::Estimate
    }
    fn coverage(&self) -> &str {
        "gpu-tdp-estimate"
    }
    fn joules(&mut self) -> Result<f64, String> {
        Ok(self.watts * self.start.elapsed().as_secs_f64())
    }
}

/// The GPU a run uses, for the energy meters: its name and board power when known.
#[derive(Debug, Clone)]
pub struct GpuInfo {
    pub name: String,
    pub tdp_watts: Option<f64>,
}

/// Several meters at once (GPU and CPU): the total is their sum, and each is a component.
pub struct Meters {
    pub meters: Vec<Box<dyn EnergyMeter>>,
    last: Vec<f64>,
}

impl Meters {
    pub fn new(meters: Vec<Box<dyn EnergyMeter>>) -> Self {
        let n = meters.len();
        Self { meters, last: vec![0.0; n] }
    }

    /// `auto`: NVML for GPUs when it loads, plus RAPL for the CPU where readable, else the CPU
    /// estimate. `rapl` and `nvml` fail if they cannot be read. When the run uses a GPU (`gpu`)
    /// and NVML cannot read it, `auto` says why and adds the GPU at its board power (TDP) as an
    /// estimate, or says the GPU is not counted when its TDP is unknown.
    pub fn choose(kind: Meter, powercap: &Path, watts_per_core: f64, idle_watts: f64, gpu: Option<&GpuInfo>) -> Result<(Self, Vec<String>), String> {
        let estimate = || Box::new(Estimate::new(watts_per_core, idle_watts)) as Box<dyn EnergyMeter>;
        match kind {
            Meter::Estimate => return Ok((Self::new(vec![estimate()]), vec![])),
            Meter::Rapl => {
                let (r, w) = Rapl::open(powercap)?;
                return Ok((Self::new(vec![Box::new(r)]), w));
            }
            Meter::Auto | Meter::Nvml => {}
        }
        // The GPU's meter (if any) and notes; `None`: no GPU part, the CPU meters alone.
        let gpu_part: Option<(Option<Box<dyn EnergyMeter>>, Vec<String>)> = match Nvml::open() {
            Ok((nvml, notes)) => Some((Some(Box::new(nvml)), notes)),
            Err(e) if kind == Meter::Nvml => return Err(e),
            Err(e) => gpu.map(|g| match g.tdp_watts {
                Some(w) => (
                    Some(Box::new(GpuTdp::new(w)) as Box<dyn EnergyMeter>),
                    vec![format!("{e}: the energy of {} is estimated at its board power, {w:.0} W, for the whole run (an upper bound)", g.name)],
                ),
                None => (None, vec![format!("{e}: the energy of {} is not counted (its board power is not in Kiln's table); only the CPU's is", g.name)]),
            }),
        };
        // The CPU: RAPL where readable, else the estimate.
        let (cpu, cpu_notes) = match Rapl::open(powercap) {
            Ok((r, w)) => (Box::new(r) as Box<dyn EnergyMeter>, w),
            Err(e) => (estimate(), vec![format!("RAPL unavailable ({e}); using the CPU-time estimate")]),
        };
        let (gpu_meter, mut notes) = gpu_part.unwrap_or_default();
        notes.extend(cpu_notes);
        Ok((Self::new(gpu_meter.into_iter().chain([cpu]).collect()), notes))
    }

    /// Cumulative joules and each component. A meter that fails keeps its last reading and
    /// the error is returned beside it, so no reading silently becomes 0 J.
    pub fn read(&mut self) -> (f64, Vec<Component>, Vec<String>) {
        let mut errors = Vec::new();
        let mut comps = Vec::with_capacity(self.meters.len());
        for (m, last) in self.meters.iter_mut().zip(&mut self.last) {
            match m.joules() {
                Ok(j) => *last = j,
                Err(e) => errors.push(format!("{}: {e}", m.name())),
            }
            comps.push(Component { meter: m.name().into(), method: m.method(), coverage: m.coverage().into(), joules: *last });
        }
        (comps.iter().map(|c| c.joules).sum(), comps, errors)
    }

    /// `counter` if every meter is one, else the weakest method present.
    pub fn method(&self) -> Method {
        let ms: Vec<Method> = self.meters.iter().map(|m| m.method()).collect();
        if ms.contains(&Method::Estimate) {
            Method::Estimate
        } else if ms.contains(&Method::Polled) {
            Method::Polled
        } else {
            Method::Counter
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone(root: &Path, name: &str, energy: &str, max: &str) -> PathBuf {
        let z = root.join(name);
        std::fs::create_dir_all(&z).unwrap();
        std::fs::write(z.join("energy_uj"), energy).unwrap();
        std::fs::write(z.join("max_energy_range_uj"), max).unwrap();
        z
    }

    #[test]
    fn rapl_sums_packages_handles_wraparound_and_skips_unreadable_zones() {
        let d = tempfile::tempdir().unwrap();
        let p0 = zone(d.path(), "intel-rapl:0", "1000000", "262143328850");
        let p1 = zone(d.path(), "intel-rapl:1", "262143000000", "262143328850");
        zone(d.path(), "intel-rapl:0:0", "5", "100"); // a sub-zone: not counted
        // An unreadable zone: energy_uj is a directory.
        let bad = d.path().join("intel-rapl:2");
        std::fs::create_dir_all(bad.join("energy_uj")).unwrap();
        std::fs::write(bad.join("max_energy_range_uj"), "10").unwrap();
        let (mut r, warnings) = Rapl::open(d.path()).unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("intel-rapl:2/energy_uj"), "{warnings:?}");
        assert_eq!(r.joules().unwrap(), 0.0);
        // Package 0 gains 2.5 J; package 1 wraps: 328850 µJ to the top, then 171150 µJ: 0.5 J.
        std::fs::write(p0.join("energy_uj"), "3500000").unwrap();
        std::fs::write(p1.join("energy_uj"), "171150").unwrap();
        assert!((r.joules().unwrap() - 3.0).abs() < 1e-9);
        std::fs::write(p0.join("energy_uj"), "4500000").unwrap();
        assert!((r.joules().unwrap() - 4.0).abs() < 1e-9);
        // A zone that becomes unreadable is an error, not 0 J.
        std::fs::write(p0.join("energy_uj"), "garbage").unwrap();
        assert!(r.joules().unwrap_err().contains("not a number"));
        let mut m = Meters::new(vec![Box::new(r)]);
        let (j, comps, errs) = m.read();
        assert_eq!(errs.len(), 1);
        assert_eq!(j, 0.0); // the meter's last good reading in Meters starts at 0 and is kept
        assert_eq!(comps[0].method, Method::Counter);
    }

    #[test]
    fn no_rapl_means_the_estimate_and_says_so() {
        let d = tempfile::tempdir().unwrap();
        let (m, notes) = Meters::choose(Meter::Auto, d.path(), 10.0, 0.0, None).unwrap();
        assert_eq!(m.method(), Method::Estimate);
        assert!(notes[0].contains("RAPL unavailable"));
        assert!(Meters::choose(Meter::Rapl, d.path(), 10.0, 0.0, None).is_err());
    }

    #[test]
    fn a_gpu_nvml_cannot_read_is_estimated_at_its_board_power() {
        // This machine has no NVML. A run on a GPU then counts the GPU at its TDP (estimate) plus
        // the CPU, and says why; an unknown TDP is said, not guessed.
        if Nvml::open().is_ok() {
            println!("SKIP: NVML loads here; the fallback is not exercised");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let gpu = GpuInfo { name: "NVIDIA H200".into(), tdp_watts: Some(700.0) };
        let (mut m, notes) = Meters::choose(Meter::Auto, d.path(), 10.0, 0.0, Some(&gpu)).unwrap();
        assert_eq!(m.meters.len(), 2);
        assert_eq!(m.meters[0].coverage(), "gpu-tdp-estimate");
        assert_eq!(m.method(), Method::Estimate);
        assert!(notes[0].contains("NVIDIA H200") && notes[0].contains("700 W"), "{notes:?}");
        std::thread::sleep(std::time::Duration::from_millis(50));
        let (j, comps, errors) = m.read();
        assert!(errors.is_empty());
        assert!(j >= 700.0 * 0.05 * 0.99 && j < 700.0 * 2.0, "{j} J after 50 ms at 700 W");
        assert_eq!(comps.len(), 2);

        let unknown = GpuInfo { name: "Some GPU".into(), tdp_watts: None };
        let (m, notes) = Meters::choose(Meter::Auto, d.path(), 10.0, 0.0, Some(&unknown)).unwrap();
        assert_eq!(m.meters.len(), 1);
        assert!(notes[0].contains("not counted"), "{notes:?}");
    }

    #[test]
    fn estimate_is_reproducible_from_cpu_time() {
        let e = Estimate::new(12.0, 5.0);
        assert_eq!(e.joules_for(10.0, 4.0), 140.0);
        assert_eq!(e.joules_for(0.0, 0.0), 0.0);
        let mut e = Estimate::new(DEFAULT_WATTS_PER_CORE, 0.0);
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed().as_millis() < 50 {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        let j = e.joules().unwrap();
        assert!(j > 0.2 && j < 5.0, "50 ms of one busy core at 12 W is about 0.6 J, got {j} ({x})");
    }
}
