//! The processes of one run. Most runs are one process. Built with the `mpi` feature,
//! `mpirun -n R pixel run X.toml` or `srun pixel run X.toml` makes one run of R ranks that train
//! one model data-parallel; everything the ranks must agree on (summed gradients and counts, a stop
//! flag, the exit code, checksums) goes through a [`World`]. Imports nothing of the crate.
//!
//! Without a launcher a `World` is a single process and every collective is the identity: a run
//! that is not launched by MPI never initialises it.

use std::cell::Cell;
use std::ops::Range;
#[cfg(feature = "mpi")]
use std::time::Instant;

/// What a launcher tells its processes through the environment: the job's size and this
/// process's rank, readable before (and without) MPI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub launcher: &'static str,
    pub rank: usize,
    pub size: usize,
}

/// The launcher this process runs under, if any, from the variables Open MPI's `mpirun`,
/// MPICH's and Intel MPI's `mpiexec` (PMI) and Slurm's `srun` set for every process they start.
/// Slurm's batch script itself sets no step variables: `pixel run` started there is one process.
pub fn launch() -> Option<Launch> {
    launch_from(|key| std::env::var(key).ok())
}

fn launch_from(var: impl Fn(&str) -> Option<String>) -> Option<Launch> {
    let number = |key: &str| var(key)?.trim().parse::<usize>().ok();
    const LAUNCHERS: [(&str, &str, &str); 3] = [
        (
            "mpirun (Open MPI)",
            "OMPI_COMM_WORLD_RANK",
            "OMPI_COMM_WORLD_SIZE",
        ),
        ("mpiexec (PMI)", "PMI_RANK", "PMI_SIZE"),
        ("srun", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"),
    ];
    LAUNCHERS.iter().find_map(|&(launcher, rank, size)| {
        Some(Launch {
            launcher,
            rank: number(rank).unwrap_or(0),
            size: number(size)?,
        })
    })
}

/// The ranks of a run, as this process sees them.
pub struct World {
    rank: usize,
    size: usize,
    local_rank: usize,
    local_size: usize,
    launcher: Option<&'static str>,
    /// Seconds spent in collectives so far (what a step waits for the other ranks and the sums).
    collective_seconds: Cell<f64>,
    /// With `separate_waiting`: seconds of that spent waiting for the slowest rank (a barrier
    /// before each sum), so that the rest is the reduction itself.
    waiting_seconds: Cell<f64>,
    separate_waiting: Cell<bool>,
    /// Whether the ranks have learnt together that one of them failed.
    failure_agreed: Cell<bool>,
    #[cfg(feature = "mpi")]
    mpi: Option<Mpi>,
}

/// The communicator and the MPI environment; dropping it finalises MPI (after the communicator).
#[cfg(feature = "mpi")]
struct Mpi {
    world: mpi::topology::SimpleCommunicator,
    _universe: mpi::environment::Universe,
}

impl World {
    /// One process: rank 0 of 1.
    pub fn single() -> World {
        World {
            rank: 0,
            size: 1,
            local_rank: 0,
            local_size: 1,
            launcher: None,
            collective_seconds: Cell::new(0.0),
            waiting_seconds: Cell::new(0.0),
            separate_waiting: Cell::new(false),
            failure_agreed: Cell::new(false),
            #[cfg(feature = "mpi")]
            mpi: None,
        }
    }

    /// Joins the job this process was launched into: a single process without a launcher (or a
    /// launcher of one), the MPI world otherwise. Refuses a job of several ranks in a binary built
    /// without MPI, and one whose MPI does not see the ranks the launcher started (each would
    /// train the same run into one folder).
    pub fn join() -> Result<World, String> {
        match launch() {
            Some(launch) if launch.size > 1 => Self::join_mpi(launch),
            _ => Ok(World::single()),
        }
    }

    #[cfg(not(feature = "mpi"))]
    fn join_mpi(launch: Launch) -> Result<World, String> {
        Err(format!(
            "started this process as rank {} of {}, but this pixel was built without the `mpi` \
             feature: the {} copies would each train the whole run into one results folder. \
             Rebuild with `cargo build --release --features mpi` (add `tch` for libtorch; see \
             docs/parallel.md), or start a single process",
            launch.rank, launch.size, launch.size
        ))
    }

    #[cfg(feature = "mpi")]
    fn join_mpi(launch: Launch) -> Result<World, String> {
        use mpi::topology::Communicator;
        // Only the main thread calls MPI; the backends' worker threads never do.
        let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled)
            .ok_or("MPI was already initialised in this process")?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        if size != launch.size {
            return Err(format!(
                "started {} processes but MPI sees a world of {size}: the launcher and the MPI \
                 library this pixel links do not talk to each other (under Slurm try `srun \
                 --mpi=pmix` or `mpirun` inside the allocation)",
                launch.size
            ));
        }
        let node = world.split_shared(rank as i32);
        let (local_rank, local_size) = (node.rank() as usize, node.size() as usize);
        Ok(World {
            rank,
            size,
            local_rank,
            local_size,
            launcher: Some(launch.launcher),
            collective_seconds: Cell::new(0.0),
            waiting_seconds: Cell::new(0.0),
            separate_waiting: Cell::new(false),
            failure_agreed: Cell::new(false),
            mpi: Some(Mpi {
                world,
                _universe: universe,
            }),
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// This process's rank among the ranks of its node (which GPU it takes).
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// How many ranks share this node.
    pub fn local_size(&self) -> usize {
        self.local_size
    }

    /// Rank 0 writes the results folder; the others only compute.
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// The launcher that started the job, for a job of several ranks.
    pub fn launcher(&self) -> Option<&'static str> {
        self.launcher
    }

    /// This rank's contiguous share of `n` items: ranks take `n / size` each, the first
    /// `n % size` ranks one more, in rank order, so that the shares cover `0..n` once.
    pub fn share(&self, n: usize) -> Range<usize> {
        share(n, self.rank, self.size)
    }

    /// Records that every rank knows of a failure (so that each can end on its own).
    pub fn note_failure_agreed(&self) {
        self.failure_agreed.set(true);
    }

    pub fn failure_agreed(&self) -> bool {
        self.failure_agreed.get()
    }

    /// Seconds spent in collectives so far.
    pub fn collective_seconds(&self) -> f64 {
        self.collective_seconds.get()
    }

    /// Seconds of [`World::collective_seconds`] spent waiting for the slowest rank, when
    /// measured (see [`World::separate_waiting`]).
    pub fn waiting_seconds(&self) -> f64 {
        self.waiting_seconds.get()
    }

    /// Makes every sum wait at a barrier first and time the wait apart (for `pixel bench`: the
    /// sum's own cost, without the imbalance between ranks). Costs one more collective per sum.
    pub fn separate_waiting(&self, on: bool) {
        self.separate_waiting.set(on);
    }

    /// Times the wait for every rank when asked to.
    #[cfg(feature = "mpi")]
    fn wait_apart(&self, m: &Mpi) {
        use mpi::collective::CommunicatorCollectives;
        if self.separate_waiting.get() {
            let start = Instant::now();
            m.world.barrier();
            let waited = start.elapsed().as_secs_f64();
            self.waiting_seconds
                .set(self.waiting_seconds.get() + waited);
            self.collective_seconds
                .set(self.collective_seconds.get() + waited);
        }
    }

    #[cfg(feature = "mpi")]
    fn timed<T>(&self, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        self.collective_seconds
            .set(self.collective_seconds.get() + start.elapsed().as_secs_f64());
        out
    }

    /// Replaces every element of `values` by its sum over the ranks (the same on every rank).
    pub fn sum_f32(&self, values: &mut [f32]) {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            use mpi::collective::{CommunicatorCollectives, SystemOperation};
            let send = values.to_vec();
            self.wait_apart(m);
            self.timed(|| {
                m.world
                    .all_reduce_into(&send[..], values, SystemOperation::sum())
            });
        }
        let _ = values;
    }

    /// Replaces every element of `values` by its sum over the ranks (the same on every rank).
    pub fn sum_f64(&self, values: &mut [f64]) {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            use mpi::collective::{CommunicatorCollectives, SystemOperation};
            let send = values.to_vec();
            self.timed(|| {
                m.world
                    .all_reduce_into(&send[..], values, SystemOperation::sum())
            });
        }
        let _ = values;
    }

    /// The largest `value` over the ranks.
    pub fn max_i32(&self, value: i32) -> i32 {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            use mpi::collective::{CommunicatorCollectives, SystemOperation};
            let mut out = value;
            self.timed(|| {
                m.world
                    .all_reduce_into(&value, &mut out, SystemOperation::max())
            });
            return out;
        }
        value
    }

    /// Whether `flag` is true on any rank.
    pub fn any(&self, flag: bool) -> bool {
        self.max_i32(i32::from(flag)) > 0
    }

    /// Every rank's `value`, in rank order.
    pub fn gather_u64(&self, value: u64) -> Vec<u64> {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            use mpi::collective::CommunicatorCollectives;
            let mut out = vec![0u64; self.size];
            self.timed(|| m.world.all_gather_into(&value, &mut out[..]));
            return out;
        }
        vec![value]
    }

    /// Every rank's `text` (cut to 255 bytes at a character boundary), in rank order.
    pub fn gather_text(&self, text: &str) -> Vec<String> {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            use mpi::collective::CommunicatorCollectives;
            const WIDTH: usize = 256;
            let mut cut = text.len().min(WIDTH - 1);
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            let mut mine = [0u8; WIDTH];
            mine[..cut].copy_from_slice(&text.as_bytes()[..cut]);
            let mut all = vec![0u8; WIDTH * self.size];
            self.timed(|| m.world.all_gather_into(&mine[..], &mut all[..]));
            return all
                .chunks(WIDTH)
                .map(|c| {
                    let end = c.iter().position(|&b| b == 0).unwrap_or(c.len());
                    String::from_utf8_lossy(&c[..end]).into_owned()
                })
                .collect();
        }
        vec![text.to_string()]
    }

    /// Rank 0's `value`, on every rank.
    pub fn broadcast_i32(&self, value: i32) -> i32 {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            use mpi::collective::Root;
            use mpi::topology::Communicator;
            let mut v = value;
            self.timed(|| m.world.process_at_rank(0).broadcast_into(&mut v));
            return v;
        }
        value
    }

    /// Waits for every rank.
    pub fn barrier(&self) {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            use mpi::collective::CommunicatorCollectives;
            self.timed(|| m.world.barrier());
        }
    }

    /// Ends every rank of the job with `code` (MPI_Abort); a single process just exits.
    pub fn abort(&self, code: i32) -> ! {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            use mpi::topology::Communicator;
            m.world.abort(code);
        }
        std::process::exit(code)
    }
}

/// Rank `rank`'s share of `n` items over `size` ranks (see [`World::share`]).
pub fn share(n: usize, rank: usize, size: usize) -> Range<usize> {
    let (base, extra) = (n / size, n % size);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// This machine's host name (for `run.json`), or "unknown".
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Threads for each rank's backend when several ranks share a node and the user set neither
/// `OMP_NUM_THREADS` (libtorch) nor `RAYON_NUM_THREADS` (flex): the node's cores divided among
/// them, as `torchrun` does, instead of every rank starting one thread per core.
pub fn threads_per_rank(world: &World) -> Option<usize> {
    let set = ["OMP_NUM_THREADS", "RAYON_NUM_THREADS"]
        .iter()
        .any(|v| std::env::var_os(v).is_some());
    if world.local_size() <= 1 || set {
        return None;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some((cores / world.local_size()).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn shares_cover_every_item_once_in_rank_order() {
        for size in 1..6 {
            for n in 0..20 {
                let shares: Vec<Range<usize>> = (0..size).map(|r| share(n, r, size)).collect();
                assert_eq!(shares[0].start, 0);
                assert_eq!(shares[size - 1].end, n);
                for w in shares.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
                let lens: Vec<usize> = shares.iter().map(|s| s.len()).collect();
                assert!(lens.iter().max().unwrap() - lens.iter().min().unwrap() <= 1);
            }
        }
        assert_eq!(share(64, 1, 2), 32..64);
    }

    #[test]
    fn launchers_are_read_from_their_variables() {
        let env = |pairs: &[(&str, &str)]| {
            let map: HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            launch_from(move |k| map.get(k).cloned())
        };
        assert_eq!(env(&[]), None);
        let ompi = env(&[("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "4")]).unwrap();
        assert_eq!(
            (ompi.launcher, ompi.rank, ompi.size),
            ("mpirun (Open MPI)", 1, 4)
        );
        let srun = env(&[("SLURM_PROCID", "3"), ("SLURM_STEP_NUM_TASKS", "8")]).unwrap();
        assert_eq!((srun.rank, srun.size), (3, 8));
        // A batch script has job variables but no step: one process.
        assert_eq!(env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "8")]), None);
        let pmi = env(&[("PMI_RANK", "0"), ("PMI_SIZE", "2")]).unwrap();
        assert_eq!(pmi.size, 2);
    }

    #[test]
    fn a_single_world_reduces_to_the_identity() {
        let world = World::single();
        let mut v = [1.5f32, -2.0];
        world.sum_f32(&mut v);
        assert_eq!(v, [1.5, -2.0]);
        assert_eq!(world.max_i32(3), 3);
        assert!(world.any(true) && !world.any(false));
        assert_eq!(world.gather_u64(7), vec![7]);
        assert_eq!(world.gather_text("cpu"), vec!["cpu".to_string()]);
        assert!(world.is_root() && world.size() == 1);
        assert_eq!(world.share(5), 0..5);
    }
}
