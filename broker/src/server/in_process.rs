//! A local cluster inside one process: N brokers on loopback sharing one heap-backed pool,
//! for tests and experiments that want real sockets and real broker code without
//! separate processes or hugepages (`scripts/cluster.sh` runs separate processes).

use std::net::SocketAddr;
use std::sync::Arc;

use crate::server::limits::ClientLimits;
use crate::server::sequencing::SequencerPlacement;
use crate::server::state::BrokerSettings;
use crate::server::{
    BrokerOptions, IdleStrategy, NetBackend, PoolFailure, RunningBroker, StartError, start,
};
use shared_log::coherence::CoherenceMode;
use shared_log::heap::HeapRegion;
use shared_log::layout::Geometry;
use shared_log::pool::{Pool, PoolError};
use shared_log::sequencer::SequencerConfig;

/// N running brokers and the pool they share.
#[derive(Debug)]
pub struct InProcessCluster {
    brokers: Vec<RunningBroker>,
    /// Each broker's options, to start it again.
    options: Vec<BrokerOptions>,
    mode: CoherenceMode,
    // Dropped after the brokers (fields drop in declaration order).
    region: Arc<HeapRegion>,
}

/// The error for a failed `failure` step on the heap pool.
fn pool_error(failure: PoolFailure) -> impl Fn(PoolError) -> StartError {
    move |e| StartError::Pool {
        path: "(in-process heap pool)".to_owned(),
        failure,
        reason: e.to_string(),
    }
}

impl InProcessCluster {
    /// Formats a pool of `geometry` and starts brokers `0..geometry.brokers_max` on
    /// `127.0.0.1:0` (broker 0 is the head). `configure` may adjust each broker's options.
    pub fn start(
        geometry: Geometry,
        mode: CoherenceMode,
        configure: impl Fn(&mut BrokerOptions),
    ) -> Result<InProcessCluster, StartError> {
        let region = Arc::new(HeapRegion::new(geometry.layout_bytes()));
        Pool::format(region.memory(mode), geometry, 1).map_err(pool_error(PoolFailure::Format))?;
        let mut brokers = Vec::new();
        let mut all_options = Vec::new();
        for id in 0..geometry.brokers_max as u16 {
            let mut options = BrokerOptions {
                settings: BrokerSettings {
                    broker_id: id,
                    head: id == 0,
                    auto_create_topics: false,
                    batch_bytes_max: 1 << 20,
                    frame_bytes_max: wire::FRAME_BYTES_DEFAULT,
                    replication_factor: 1,
                    limits: ClientLimits::default(),
                    history_dir: None,
                },
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                kafka_listen: None,
                advertise: None,
                socket_buffer_bytes: 1 << 20,
                idle: IdleStrategy::Sleep,
                sequencer_placement: SequencerPlacement::default(),
                sequencer: SequencerConfig::default(),
                metrics_listen: None,
                metrics_limits: crate::metrics::EndpointLimits::default(),
                net: NetBackend::Kernel,
                replica: None,
                standby: false,
                claim_lease_ms: crate::server::CLAIM_LEASE_MS_DEFAULT,
            };
            configure(&mut options);
            let pool =
                Pool::attach(region.memory(mode)).map_err(pool_error(PoolFailure::Incompatible))?;
            brokers.push(start(pool, options.clone())?);
            all_options.push(options);
        }
        Ok(InProcessCluster {
            brokers,
            options: all_options,
            mode,
            region,
        })
    }

    /// The running brokers, by id.
    pub fn brokers(&self) -> &[RunningBroker] {
        &self.brokers
    }

    /// The brokers' client addresses, by id.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.brokers.iter().map(RunningBroker::local_addr).collect()
    }

    /// Kills broker `id` abruptly, as a crash would look to its clients (see
    /// [`RunningBroker::kill`]): its listener and every connection close at once. The other
    /// brokers go on; killing the head also ends the sequencer. Returns false when there is
    /// no broker `id`. A killed broker stays in [`brokers`](Self::brokers) (its metrics are
    /// still readable) until [`restart_broker`](Self::restart_broker).
    pub fn kill_broker(&mut self, id: u16) -> bool {
        match self.brokers.get_mut(usize::from(id)) {
            Some(broker) => {
                broker.kill();
                true
            }
            None => false,
        }
    }

    /// Stops broker `id` in order (see [`RunningBroker::shut_down`]): its claim on the id
    /// is given back. Returns false when there is no broker `id`.
    pub fn stop_broker(&mut self, id: u16) -> bool {
        match self.brokers.get_mut(usize::from(id)) {
            Some(broker) => {
                broker.shut_down();
                true
            }
            None => false,
        }
    }

    /// Starts broker `id` again with its options, on a new address (it picks up its ring).
    /// Its claim on the id decides when: at once after a stop, after the claim lease after a
    /// kill, and never while it runs (`StartError::Claim`, the running one stays).
    pub fn restart_broker(&mut self, id: u16) -> Result<(), StartError> {
        let index = usize::from(id);
        let options = self
            .options
            .get(index)
            .ok_or(pool_error(PoolFailure::Incompatible)(
                PoolError::NoSuchBroker {
                    broker: id,
                    brokers_max: self.options.len() as u32,
                },
            ))?
            .clone();
        let pool = Pool::attach(self.region.memory(self.mode))
            .map_err(pool_error(PoolFailure::Incompatible))?;
        self.brokers[index] = start(pool, options)?;
        Ok(())
    }

    /// Batches any broker lost track of (must be 0).
    pub fn batches_dropped(&self) -> u64 {
        self.brokers
            .iter()
            .map(|b| {
                b.metrics()
                    .batches_dropped
                    .load(std::sync::atomic::Ordering::Relaxed)
            })
            .sum()
    }
}
