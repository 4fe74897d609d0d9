//! The owner thread: keeps a lease alive, campaigns on `/tidb/br-stream/owner`, and tells the
//! ticker when ownership is gained or lost (lease lost, key deleted, stop). On stop it
//! resigns and revokes its lease so that a standby takes over at once; on a resign request
//! it does the same and campaigns again at the back of the queue.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use serde_json::json;

use crate::error::{Error, Result};
use crate::etcd::{Election, EtcdClient, EventKind, Leadership, LeaseKeeper, TakeOver};
use crate::meta::keys::OWNER_PREFIX;
use crate::worker::StopToken;

pub enum OwnerEvent {
    Gained(Leadership),
    /// The ticker answers on `stood_down` once it has stopped acting as owner.
    Lost {
        stood_down: Sender<()>,
    },
}

/// The last 12 hex digits (the UUID "node") of our owner ids: "shelpr" in ASCII. Keeps the
/// value a UUID v4 like TiDB's, yet tells `owner show` which candidates are ours (a random
/// TiDB id ends so with probability 2^-48).
const OUR_NODE: &str = "7368656c7072";

/// Whether an owner key's value was written by a streamhelper advancer.
pub fn is_our_owner_id(value: &[u8]) -> bool {
    value.len() == 36 && value.ends_with(OUR_NODE.as_bytes())
}

/// A random UUID v4 text, as Go's `uuid.New()` prints it.
pub fn random_uuid() -> String {
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

/// The owner id: a random UUID v4 like TiDB's, with our node marker.
pub fn new_owner_id() -> String {
    let uuid = random_uuid();
    format!("{}{OUR_NODE}", &uuid[..24])
}

/// Asks the owner thread to resign (`POST /owner/resign`); a standby has nothing to give up.
pub fn resign_reply(owner: bool, resign: &Sender<()>) -> super::status::Reply {
    let content_type = "application/json";
    if !owner {
        let body = json!({"resigned": false, "reason": "this advancer is not the owner"}).to_string();
        return super::status::Reply::Page { code: 409, content_type, body };
    }
    // A full channel means a resignation is already on its way.
    let _ = resign.try_send(());
    super::status::Reply::Page { code: 200, content_type, body: json!({"resigned": true}).to_string() }
}

/// The current owner as `/status` shows it: key, value, lease and whose it is.
pub fn owner_view(election: &Election, our_id: &str) -> serde_json::Value {
    match election.leader() {
        Ok(Some(kv)) => json!({
            "key": String::from_utf8_lossy(kv.get_key()),
            "id": String::from_utf8_lossy(kv.get_value()),
            "lease": format!("{:x}", kv.get_lease()),
            "ours": is_our_owner_id(kv.get_value()),
            "this_advancer": kv.get_value() == our_id.as_bytes(),
        }),
        Ok(None) => serde_json::Value::Null,
        Err(e) => json!({ "error": e.to_string() }),
    }
}

pub struct OwnerLoop {
    pub etcd: EtcdClient,
    pub id: String,
    pub ttl: Duration,
    pub backoff: Duration,
    pub events: Sender<OwnerEvent>,
    /// A message asks the owner to resign and campaign again (`POST /owner/resign`).
    pub resign: Receiver<()>,
    /// Evict older candidates instead of waiting behind them (`--take-over`).
    pub take_over: bool,
    /// Leave like a killed process: neither resign nor revoke the lease (`DaemonHandle::crash`).
    pub crashed: Arc<AtomicBool>,
    pub stop: StopToken,
}

/// How a term ended without an error.
enum TermEnd {
    /// Asked to stop (or the ticker is gone): resigned.
    Stopped,
    /// Ownership was lost; campaign again.
    Lost,
    /// Resigned on request (`POST /owner/resign`); campaign again at the back.
    Resigned,
}

impl OwnerLoop {
    pub fn run(self) {
        let election = Election::new(self.etcd.clone(), OWNER_PREFIX);
        let mut take_over = self.take_over;
        while !self.stop.is_stopped() {
            match self.one_term(&election, take_over) {
                Ok(TermEnd::Stopped) => return,
                Ok(TermEnd::Lost) => {}
                // Taking over again at once would undo the resignation.
                Ok(TermEnd::Resigned) => {
                    if take_over {
                        log::warn!("resigned on request: --take-over is off until this process restarts");
                        take_over = false;
                    }
                }
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
    fn one_term(&self, election: &Election, take_over: bool) -> Result<TermEnd> {
        let lease = self.etcd.grant_lease(self.ttl)?;
        let end = self.hold_lease(election, lease, take_over);
        if !self.crashed.load(Ordering::SeqCst) {
            let _ = self.etcd.revoke_lease(lease);
        }
        end
    }

    /// Campaigns under `lease`, kept alive meanwhile, and leads until something ends it.
    fn hold_lease(&self, election: &Election, lease: i64, take_over: bool) -> Result<TermEnd> {
        let keeper = self.etcd.keep_alive(lease, self.ttl)?;
        // Our own advancers queue among themselves; two taking over would evict each other.
        let take_over = take_over.then_some(TakeOver { backoff: self.backoff, evictable: |v| !is_our_owner_id(v) });
        let leadership = match election.campaign_with(lease, self.id.as_bytes(), &self.stop, take_over) {
            Ok(leadership) => leadership,
            Err(Error::Stopped(_)) => return Ok(TermEnd::Stopped),
            Err(e) => return Err(e),
        };
        log::info!("daemon became owner: {} holds {}", self.id, String::from_utf8_lossy(&leadership.key));
        let end = self.lead(election, &leadership, &keeper);
        // Ordering:
        // 1. Lost first, so the ticker stops uploading before anything else happens.
        // 2. Before resigning, wait until the ticker has stood down: a tick in flight makes
        //    PD calls (the GC safepoint) that the key does not fence, and once the key is gone
        //    a standby may lead and make its own. Ticks are bounded by their deadline; the
        //    wait by the lease TTL, after which a standby could lead anyway.
        // 3. Resign (delete our key) before revoking the lease (in `one_term`): the key is
        //    both the fence of our writes and what standbys wait on, so from the delete on
        //    nothing of ours lands and a standby may lead, even if we stall or die before
        //    the revoke with the lease still renewed.
        let (stood_down_tx, stood_down) = crossbeam_channel::bounded(1);
        let _ = self.events.send(OwnerEvent::Lost { stood_down: stood_down_tx });
        if matches!(end, Ok(TermEnd::Stopped | TermEnd::Resigned)) && !self.crashed.load(Ordering::SeqCst) {
            // A ticker that is gone dropped the sender: nothing to wait for.
            if let Err(RecvTimeoutError::Timeout) = stood_down.recv_timeout(self.ttl) {
                log::warn!("the ticker did not stand down within {:?}; resigning anyway", self.ttl);
            }
            if let Err(e) = election.resign(&leadership) {
                log::warn!("resigning ownership failed (the lease expiry will release it): {e}");
            }
            fail::fail_point!("between-resign-and-revoke");
        }
        end
    }

    /// Tells the ticker, then waits for stop, a resign request, a lost lease or the loss of
    /// our key.
    fn lead(&self, election: &Election, leadership: &Leadership, keeper: &LeaseKeeper) -> Result<TermEnd> {
        let Some(read_at) = election.leading_at(leadership)? else { return Ok(TermEnd::Lost) };
        let mut watch = election.watch_leadership(leadership, read_at + 1)?;
        // A request made while we stood by is not for this term.
        while self.resign.try_recv().is_ok() {}
        if self.events.send(OwnerEvent::Gained(leadership.clone())).is_err() {
            // Nobody to tell (the ticker is gone): we are shutting down.
            return Ok(TermEnd::Stopped);
        }
        loop {
            crossbeam_channel::select! {
                recv(self.stop.receiver()) -> _ => return Ok(TermEnd::Stopped),
                recv(self.resign) -> _ => {
                    log::warn!("resigning ownership on request; campaigning again behind the other candidates");
                    return Ok(TermEnd::Resigned);
                }
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
        assert!(super::is_our_owner_id(id.as_bytes()));
        assert!(!super::is_our_owner_id(b"6f1d9d1c-2f4e-4a51-9c8a-2b1e5d3c7a90"), "a TiDB id");
    }
}
