//! Several ranges of one blob in one GET: `Range: bytes=a-b,c-d,…`, answered with a
//! `multipart/byteranges` body (RFC 9110 §14.6), as the distribution registry (Go's
//! `http.ServeContent`), nginx and Apache do.
//!
//! Every request costs the registry its own work (on the cold-start benchmark's registry about
//! 4.4 ms of CPU, whatever its size, against about 0.2 ms for each further range of one
//! request), so ranges known together — the checkpoint windows of a profile's replay — go
//! together. Nothing here trusts the answer more than a single range's: callers check every
//! byte against its digest as before.
//!
//! Servers that cannot (object stores behind a redirect often cannot) answer with the whole
//! blob (200), with one range, with 400, 416 or 501, or with a body larger than asked for.
//! Then the response is dropped unread (a 200's body costs at most what was in flight), the
//! endpoint is remembered as single-range for the life of the client, and whatever is still
//! missing is read one range per request through [`Transport::get_range`] ([`SINGLES`] at a
//! time), with its retries, mirrors and redirects. So a registry without the feature costs one
//! wasted request per client, and the answer is never wrong. Any other failure of the request
//! (after [`Transport::send`]'s retries) is the call's error: it is not retried range by range.
//!
//! Bounds: at most [`MAX_PARTS`] ranges and a `Range` header of at most [`MAX_HEADER`] bytes
//! per request (servers cap header lines: nginx at 8 KiB); a body is read only up to the bytes
//! asked for plus [`PART_OVERHEAD`] per part, and a part's headers are at most that long.

use std::collections::HashMap;

use super::{header, read_capped, Request, Transport};
use crate::registry::hosts::Endpoint;
use crate::registry::RegistryError;
use reqwest::header::{CONTENT_RANGE, CONTENT_TYPE};
use reqwest::StatusCode;

/// Ranges per request at most.
pub(crate) const MAX_PARTS: usize = 64;
/// Length of a `Range` header at most.
const MAX_HEADER: usize = 3000;
/// Bytes of delimiters and headers a response may spend per part.
const PART_OVERHEAD: u64 = 1024;
/// Ranges read one request each at a time, where several in one request are not answered.
const SINGLES: usize = 8;

impl Transport {
    /// GETs `ranges` (offset, length) of a blob, each returned in the order asked, in as few
    /// requests as the first endpoint allows; what it does not answer is read range by range
    /// ([`get_range`](Self::get_range)), so the result is the same as theirs.
    pub(crate) async fn get_ranges(
        &self,
        endpoints: &[Endpoint],
        req: &Request<'_>,
        ranges: &[(u64, u64)],
    ) -> Result<Vec<Vec<u8>>, RegistryError> {
        use futures_util::StreamExt;
        let intervals = merged(ranges);
        let mut got: HashMap<u64, Vec<u8>> = HashMap::new();
        if let (true, Some(ep)) = (intervals.len() > 1, endpoints.first()) {
            if self.multirange_ok(ep, req) {
                let groups = groups(&intervals);
                let answers = futures_util::future::join_all(
                    groups.iter().map(|g| self.get_group(ep, req, g)),
                )
                .await;
                for answer in answers {
                    got.extend(answer?);
                }
            }
        }
        let missing: Vec<(u64, u64)> = intervals
            .iter()
            .copied()
            .filter(|(s, _)| !got.contains_key(s))
            .collect();
        let mut singles = futures_util::stream::iter(missing)
            .map(|(s, e)| async move { (s, self.get_range(endpoints, req, s, e - s).await) })
            .buffer_unordered(SINGLES);
        while let Some((s, data)) = singles.next().await {
            got.insert(s, data?);
        }
        Ok(ranges
            .iter()
            .map(|&(offset, len)| {
                if len == 0 {
                    return Vec::new();
                }
                // The merged interval holding this range: the last starting at or before it.
                let at = intervals.partition_point(|(s, _)| *s <= offset) - 1;
                let (start, data) = (intervals[at].0, &got[&intervals[at].0]);
                let from = (offset - start) as usize;
                data[from..from + len as usize].to_vec()
            })
            .collect())
    }

    /// Whether `ep` may be sent several ranges of `req`'s blob in one request: not an
    /// endpoint that did not answer such a request, nor a blob read from where the registry
    /// redirected it (single ranges go there directly).
    fn multirange_ok(&self, ep: &Endpoint, req: &Request<'_>) -> bool {
        if self.single_range_hosts.lock().unwrap().contains(&ep.host) {
            return false;
        }
        let asked = match ep.is_mirror {
            true => format!("{}?ns={}", req.url(&ep.base), req.reference.registry()),
            false => req.url(&ep.base),
        };
        self.locations
            .get(&asked, std::time::Instant::now())
            .is_none()
    }

    /// One request for the intervals of `group`: those its answer holds, by start (none when
    /// the endpoint does not answer several ranges at once).
    async fn get_group(
        &self,
        ep: &Endpoint,
        req: &Request<'_>,
        group: &[(u64, u64)],
    ) -> Result<Vec<(u64, Vec<u8>)>, RegistryError> {
        let spec: Vec<String> = group
            .iter()
            .map(|(s, e)| format!("{s}-{}", e - 1))
            .collect();
        let single_range = |why: &str| {
            tracing::info!(host = %ep.host, subject = %req.subject, "{why}: this registry's ranges are read one request each");
            self.single_range_hosts
                .lock()
                .unwrap()
                .insert(ep.host.clone());
        };
        let resp = match self
            .send(ep, req, Some(&format!("bytes={}", spec.join(","))))
            .await
        {
            Ok(resp) => resp,
            Err(RegistryError::Status { status, .. }) if matches!(status, 400 | 416 | 501) => {
                single_range(&format!("several ranges in one request answered {status}"));
                return Ok(Vec::new());
            }
            Err(e) => return Err(e),
        };
        if resp.status() != StatusCode::PARTIAL_CONTENT {
            // Dropped unread: a whole blob is not what was asked for.
            single_range(&format!(
                "several ranges in one request answered {}",
                resp.status()
            ));
            return Ok(Vec::new());
        }
        let content_type = header(resp.headers(), CONTENT_TYPE.as_str()).unwrap_or_default();
        let content_range = header(resp.headers(), CONTENT_RANGE.as_str());
        let asked: u64 = group.iter().map(|(s, e)| e - s).sum();
        let cap = asked + PART_OVERHEAD * (group.len() as u64 + 1);
        let body = match read_capped(resp, cap).await {
            Ok(Some(body)) => body,
            Ok(None) => {
                single_range("several ranges in one request answered with more than asked for");
                return Ok(Vec::new());
            }
            // A body cut short: the ranges one by one (each resumes where it breaks).
            Err(_) => return Ok(Vec::new()),
        };
        let parts = match boundary(&content_type) {
            Some(b) => parts(&body, &b).unwrap_or_default(),
            None => content_range
                .as_deref()
                .and_then(|v| range_of(v.as_bytes()))
                .filter(|(s, end)| end - s == body.len() as u64)
                .map(|(s, _)| vec![(s, &body[..])])
                .unwrap_or_default(),
        };
        let answered: Vec<(u64, Vec<u8>)> = group
            .iter()
            .filter_map(|&(s, e)| {
                parts.iter().find_map(|&(at, data)| {
                    let end = at.checked_add(data.len() as u64)?;
                    (at <= s && e <= end)
                        .then(|| data[(s - at) as usize..(e - at) as usize].to_vec())
                        .map(|d| (s, d))
                })
            })
            .collect();
        if answered.len() < group.len() && parts.len() <= 1 {
            single_range("several ranges in one request answered with one");
        }
        Ok(answered)
    }

    /// Whether [`get_ranges`](Self::get_ranges) of `req`'s blob would ask for several ranges
    /// in one request (its first endpoint answers them, and the blob is not read from a
    /// redirect's location).
    pub(crate) fn ranges_together(&self, endpoints: &[Endpoint], req: &Request<'_>) -> bool {
        endpoints
            .first()
            .is_some_and(|ep| self.multirange_ok(ep, req))
    }
}

/// `ranges` as sorted, disjoint, non-touching intervals `start..end` (empty ranges dropped).
fn merged(ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = ranges
        .iter()
        .filter(|(_, len)| *len > 0)
        .map(|&(o, l)| (o, o + l))
        .collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// `intervals` cut into requests of at most [`MAX_PARTS`] ranges and [`MAX_HEADER`] bytes of
/// header.
fn groups(intervals: &[(u64, u64)]) -> Vec<Vec<(u64, u64)>> {
    let mut out: Vec<Vec<(u64, u64)>> = Vec::new();
    let mut len = 0;
    for &(s, e) in intervals {
        let spec = format!("{s}-{},", e - 1).len();
        match out.last_mut() {
            Some(g) if g.len() < MAX_PARTS && len + spec <= MAX_HEADER => g.push((s, e)),
            _ => {
                out.push(vec![(s, e)]);
                len = 0;
            }
        }
        len += spec;
    }
    out
}

/// The boundary of a `multipart/byteranges` content type.
fn boundary(content_type: &str) -> Option<String> {
    let mut fields = content_type.split(';');
    let kind = fields.next()?.trim();
    if !kind.eq_ignore_ascii_case("multipart/byteranges") {
        return None;
    }
    fields.find_map(|f| {
        let (name, value) = f.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| value.trim().trim_matches('"').to_string())
            .filter(|b| !b.is_empty() && b.len() <= 70)
    })
}

/// The parts of a `multipart/byteranges` body: each part's first byte's blob offset and its
/// bytes. `None` if the body is not well formed (then nothing of it is used).
fn parts<'b>(body: &'b [u8], boundary: &str) -> Option<Vec<(u64, &'b [u8])>> {
    let delimiter = format!("--{boundary}");
    let delimiter = delimiter.as_bytes();
    let mut at = find(body, delimiter)?;
    let mut out = Vec::new();
    loop {
        at += delimiter.len();
        if body.get(at..at + 2)? == b"--" {
            return Some(out);
        }
        let head_len = find(&body[at..], b"\r\n\r\n")?;
        if head_len as u64 > PART_OVERHEAD {
            return None;
        }
        let head = &body[at..at + head_len];
        let (start, end) = head.split(|&b| b == b'\n').find_map(|line| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let colon = line.iter().position(|&b| b == b':')?;
            line[..colon]
                .eq_ignore_ascii_case(b"content-range")
                .then(|| range_of(&line[colon + 1..]))?
        })?;
        let data_at = at + head_len + 4;
        let len = usize::try_from(end - start).ok()?;
        let data = body.get(data_at..data_at.checked_add(len)?)?;
        out.push((start, data));
        at = data_at + len;
        if body.get(at..at + 2)? != b"\r\n" || !body[at + 2..].starts_with(delimiter) {
            return None;
        }
        at += 2;
    }
}

/// The bytes `first..end` of a `Content-Range` value `bytes first-last/size` (`end` is
/// `last + 1`).
fn range_of(value: &[u8]) -> Option<(u64, u64)> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (span, _size) = value.strip_prefix("bytes ")?.split_once('/')?;
    let (first, last) = span.trim().split_once('-')?;
    let (first, last): (u64, u64) = (first.parse().ok()?, last.parse().ok()?);
    (first <= last).then_some((first, last.checked_add(1)?))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn multipart(boundary: &str, parts: &[(u64, &[u8])], size: u64) -> Vec<u8> {
        let mut body = Vec::new();
        for (k, (at, data)) in parts.iter().enumerate() {
            if k > 0 {
                body.extend_from_slice(b"\r\n");
            }
            let end = at + data.len() as u64 - 1;
            body.extend_from_slice(
                format!("--{boundary}\r\nContent-Range: bytes {at}-{end}/{size}\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
            );
            body.extend_from_slice(data);
        }
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        body
    }

    #[test]
    fn a_multipart_body_gives_each_part_at_its_offset_whatever_its_bytes() {
        // Part data that looks like a delimiter does not cut the part short.
        let tricky: &[u8] = b"\r\n--b0undary\r\n\r\n";
        let body = multipart("b0undary", &[(5, b"hello"), (100, tricky)], 1000);
        let got = parts(&body, "b0undary").unwrap();
        assert_eq!(got, vec![(5, &b"hello"[..]), (100, tricky)]);
    }

    #[test]
    fn a_malformed_multipart_body_is_not_used() {
        let body = multipart("b", &[(5, b"hello"), (100, b"world")], 1000);
        // Cut short, a part longer than the body, no closing delimiter: nothing of it.
        assert_eq!(parts(&body[..body.len() - 20], "b"), None);
        let lying = String::from_utf8_lossy(&body).replace("100-104", "100-900");
        assert_eq!(parts(lying.as_bytes(), "b"), None);
        assert_eq!(parts(&body, "other"), None);
        let backwards = String::from_utf8_lossy(&body).replace("100-104", "104-100");
        assert_eq!(parts(backwards.as_bytes(), "b"), None);
        // Numbers at the edge of u64 neither overflow nor match.
        let huge = String::from_utf8_lossy(&body).replace("100-104", "0-18446744073709551615");
        assert_eq!(parts(huge.as_bytes(), "b"), None);
        let near = String::from_utf8_lossy(&body)
            .replace("100-104", "18446744073709551611-18446744073709551615");
        assert_eq!(parts(near.as_bytes(), "b"), None);
    }

    #[test]
    fn the_boundary_comes_from_a_multipart_byteranges_type_only() {
        assert_eq!(
            boundary("multipart/byteranges; boundary=abc").as_deref(),
            Some("abc")
        );
        assert_eq!(
            boundary("Multipart/ByteRanges;boundary=\"a b\"").as_deref(),
            Some("a b")
        );
        assert_eq!(boundary("application/octet-stream"), None);
        assert_eq!(boundary("multipart/form-data; boundary=abc"), None);
    }

    #[test]
    fn ranges_are_merged_and_cut_into_bounded_requests() {
        assert_eq!(
            merged(&[(10, 5), (0, 5), (5, 2), (30, 0), (12, 10)]),
            vec![(0, 7), (10, 22)]
        );
        let many: Vec<(u64, u64)> = (0..200)
            .map(|k| (k * 1_000_000_000, k * 1_000_000_000 + 1))
            .collect();
        let g = groups(&many);
        assert!(g.iter().all(|g| g.len() <= MAX_PARTS));
        assert!(g.iter().all(|g| g
            .iter()
            .map(|(s, e)| format!("{s}-{},", e - 1).len())
            .sum::<usize>()
            <= MAX_HEADER));
        assert_eq!(g.concat(), many);
    }
}
