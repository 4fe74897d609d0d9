//! The owner thread: keeps a lease alive, campaigns on `/tidb/br-stream/owner`, and tells the
//! ticker when ownership is gained or lost (lease lost, key deleted, stop). On stop it
//! resigns and revokes its lease so that a standby takes over at once.

use std::time::Duration;

use crossbeam_channel::Sender;

use crate::error::{Error, Result};
use crate::etcd::{Election, EtcdClient, EventKind, Leadership, LeaseKeeper};
use crate::meta::keys::OWNER_PREFIX;
use crate::worker::StopToken;

pub enum OwnerEvent {
    Gained(Leadership),
    Lost,
}

/// A random UUID v4 text, the owner id format TiDB uses.
pub fn new_owner_id() -> String {
    let mut bytes = [0u8; 16];
    if let Ok(mut file) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut file, &mut bytes);
    }
    if bytes == [0; 16] {
        // No urandom: fall back to time and pid, still unique enough among candidates.
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        bytes[..12].copy_from_slice(&nanos.to_le_bytes()[..12]);
        bytes[12..].copy_from_slice(&std::process::id().to_le_bytes());
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

pub struct OwnerLoop {
    pub etcd: EtcdClient,
    pub id: String,
    pub ttl: Duration,
    pub backoff: Duration,
    pub events: Sender<OwnerEvent>,
    pub stop: StopToken,
}

/// How a term ended without an error.
enum TermEnd {
    /// Asked to stop (or the ticker is gone): resigned.
    Stopped,
    /// Ownership was lost; campaign again.
    Lost,
}

impl OwnerLoop {
    pub fn run(self) {
        let election = Election::new(self.etcd.clone(), OWNER_PREFIX);
        while !self.stop.is_stopped() {
            match self.one_term(&election) {
                Ok(TermEnd::Stopped) => return,
                Ok(TermEnd::Lost) => {}
                Err(e) => {
                    log::warn!("owner campaign of {} failed, retrying in {:?}: {e}", self.id, self.backoff);
                    if self.stop.sleep(self.backoff) {
                        return;
                    }
                }
            }
        }
    }

    /// One lease: campaign, lead until something ends it, then revoke the lease.
    fn one_term(&self, election: &Election) -> Result<TermEnd> {
        let lease = self.etcd.grant_lease(self.ttl)?;
        let end = self.hold_lease(election, lease);
        let _ = self.etcd.revoke_lease(lease);
        end
    }

    /// Campaigns under `lease`, kept alive meanwhile, and leads until something ends it.
    fn hold_lease(&self, election: &Election, lease: i64) -> Result<TermEnd> {
        let keeper = self.etcd.keep_alive(lease, self.ttl)?;
        let leadership = match election.campaign(lease, self.id.as_bytes(), &self.stop) {
            Ok(leadership) => leadership,
            Err(Error::Stopped(_)) => return Ok(TermEnd::Stopped),
            Err(e) => return Err(e),
        };
        log::info!("daemon became owner: {} holds {}", self.id, String::from_utf8_lossy(&leadership.key));
        let end = self.lead(election, &leadership, &keeper);
        // Lost first, so the ticker stops uploading before anything else happens.
        let _ = self.events.send(OwnerEvent::Lost);
        if matches!(end, Ok(TermEnd::Stopped)) {
            if let Err(e) = election.resign(&leadership) {
                log::warn!("resigning ownership failed (the lease expiry will release it): {e}");
            }
        }
        end
    }

    /// Tells the ticker, then waits for stop, a lost lease or the loss of our key.
    fn lead(&self, election: &Election, leadership: &Leadership, keeper: &LeaseKeeper) -> Result<TermEnd> {
        let Some(read_at) = election.leading_at(leadership)? else { return Ok(TermEnd::Lost) };
        let mut watch = election.watch_leadership(leadership, read_at + 1)?;
        if self.events.send(OwnerEvent::Gained(leadership.clone())).is_err() {
            // Nobody to tell (the ticker is gone): we are shutting down.
            return Ok(TermEnd::Stopped);
        }
        loop {
            crossbeam_channel::select! {
                recv(self.stop.receiver()) -> _ => return Ok(TermEnd::Stopped),
                recv(keeper.lost()) -> lost => {
                    log::warn!("ownership lost: {}", lost.map(|e| e.to_string()).unwrap_or_else(|_| "lease keeper ended".into()));
                    return Ok(TermEnd::Lost);
                }
                recv(watch.batches()) -> batch => match batch {
                    Ok(Ok(batch)) if batch.events.iter().any(|e| e.kind == EventKind::Delete) => {
                        log::warn!("ownership lost: the owner key was deleted");
                        return Ok(TermEnd::Lost);
                    }
                    Ok(Ok(_)) => {}
                    // The watch ended (a compaction, a closed stream): after a backoff, check
                    // directly and watch again from that read. Never poll a finished watch.
                    _ => {
                        if self.stop.sleep(self.backoff) {
                            return Ok(TermEnd::Stopped);
                        }
                        match election.leading_at(leadership) {
                            Ok(Some(read_at)) => watch = election.watch_leadership(leadership, read_at + 1)?,
                            Ok(None) => {
                                log::warn!("ownership lost: no longer the first candidate");
                                return Ok(TermEnd::Lost);
                            }
                            Err(e) => log::warn!("checking ownership after the owner watch ended failed: {e}"),
                        }
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn owner_ids_are_uuid_v4() {
        let id = super::new_owner_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert_ne!(id, super::new_owner_id());
    }
}
