//! Raw clients of the sim's services (the generated gRPC stubs, no retries or caching), for
//! the sim's own tests and its benchmark. They page and encode keys exactly as TiDB does, so
//! they also show how a real client sees the fakes.

use std::time::Duration;

use grpcio::CallOption;

use crate::codec::{decode_boundary, encode_bytes, encode_end_key};
use crate::error::{Error, Result};
use crate::proto::logbackuppb::{GetLastFlushTSOfRegionRequest, RegionCheckpoint, RegionIdentity};
use crate::proto::logbackuppb_grpc::LogBackupClient;
use crate::proto::pdpb::{self, RequestHeader, ScanRegionsRequest};
use crate::proto::pdpb_grpc::PdClient;
use crate::security::{grpc_env, Security};
use crate::types::{KeyRange, RegionId};

const KEEPALIVE: Duration = Duration::from_secs(10);

pub fn pd_client(endpoint: &str) -> Result<PdClient> {
    Ok(PdClient::new(Security::insecure().channel(grpc_env(), endpoint, KEEPALIVE)?))
}

pub fn log_backup_client(address: &str) -> Result<LogBackupClient> {
    Ok(LogBackupClient::new(Security::insecure().channel(grpc_env(), address, KEEPALIVE)?))
}

pub fn header(cluster_id: u64) -> RequestHeader {
    let mut header = RequestHeader::new();
    header.set_cluster_id(cluster_id);
    header
}

pub fn call_option(deadline: Duration) -> CallOption {
    CallOption::default().timeout(deadline)
}

fn rpc_error(call: &'static str, target: &str, source: grpcio::Error) -> Error {
    Error::rpc(call, target, source)
}

/// Every region overlapping `range`, page by page (`page` regions per `ScanRegions`), each
/// page starting where the previous one ended, as TiDB's region iterator does.
pub fn scan_regions(
    client: &PdClient,
    target: &str,
    cluster_id: u64,
    range: &KeyRange,
    page: i32,
    deadline: Duration,
) -> Result<Vec<pdpb::Region>> {
    let mut regions = Vec::new();
    let mut start = range.start.clone();
    loop {
        let mut request = ScanRegionsRequest::new();
        request.set_header(header(cluster_id));
        request.set_start_key(encode_bytes(&start));
        request.set_end_key(encode_end_key(&range.end));
        request.set_limit(page);
        let mut response = client
            .scan_regions_opt(&request, call_option(deadline))
            .map_err(|e| rpc_error("ScanRegions", target, e))?;
        if response.get_header().has_error() {
            return Err(Error::Pd {
                endpoint: target.into(),
                reason: response.get_header().get_error().get_message().into(),
            });
        }
        let page_regions = response.take_regions().into_vec();
        let Some(last) = page_regions.last() else {
            return Err(Error::RegionScan { range: range.clone(), reason: format!("empty page from {start:?}") });
        };
        let end = decode_boundary(last.get_region().get_end_key())
            .map_err(|e| Error::RegionScan { range: range.clone(), reason: format!("bad end key: {e}") })?;
        regions.extend(page_regions);
        if end.is_empty() || (!range.end.is_empty() && end >= range.end) {
            return Ok(regions);
        }
        start = end;
    }
}

/// `GetLastFlushTSOfRegion` for `(id, epoch_version)` pairs, in one call.
pub fn last_flush_ts(
    client: &LogBackupClient,
    target: &str,
    regions: &[(RegionId, u64)],
    deadline: Duration,
) -> Result<Vec<RegionCheckpoint>> {
    let mut request = GetLastFlushTSOfRegionRequest::new();
    for &(id, version) in regions {
        let mut identity = RegionIdentity::new();
        identity.set_id(id);
        identity.set_epoch_version(version);
        request.mut_regions().push(identity);
    }
    let mut response = client
        .get_last_flush_ts_of_region_opt(&request, call_option(deadline))
        .map_err(|e| rpc_error("GetLastFlushTSOfRegion", target, e))?;
    Ok(response.take_checkpoints().into_vec())
}
