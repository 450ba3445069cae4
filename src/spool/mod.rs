//! The per-shard spool: append-only segment files, preallocated and mapped with
//! memmap2, holding length + crc32c framed records.
//!
//! Three record kinds: `Queue` (one recipient of a campaign instance, with its merge
//! values), `Done` (a terminal outcome for a Queue record, by its location) and
//! `Defer` (a temporary failure: the attempts so far, when the next is due, and the
//! receiver's reply, so an expiration can report it).
//! Recovery replays every segment in order, stops at the first torn record, and
//! yields the Queue records that have no Done record, each with its last Defer.
//! Segments are deleted oldest first once all their Queue records are done: a Done
//! or Defer record always lives in the same or a later segment than its Queue
//! record, so deleting in order never drops one whose Queue record is still on disk.
//!
//! Durability: `sync` msyncs the range written since the last sync. Records written
//! but not synced survive a process kill (they are in the page cache) but not a
//! power loss.

pub mod inbox;
pub mod ingest;
pub mod peek;
pub mod retention;

use memmap2::MmapMut;
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use thiserror::Error;

const MAGIC: &[u8; 8] = b"VOLLEYSP";
/// Version 2 added Defer records, version 3 the last reply on them. Older segments
/// are still read; appends never go to one, so an older binary refuses a spool it
/// would misread.
const VERSION: u32 = 3;
const SEG_HEADER_BYTES: usize = 16;
const FRAME_BYTES: usize = 8;
/// Largest record payload: a submitted message with its envelope (the listeners'
/// `message_size_max` is at most 1 GiB); a campaign's recipient row is bounded far
/// below it at ingest. A record bigger than `segment_bytes` gets a segment of its own.
pub const RECORD_MAX: usize = (1 << 30) + (1 << 20);

const KIND_QUEUE: u8 = 1;
const KIND_DONE: u8 = 2;
const KIND_DEFER: u8 = 3;

#[derive(Debug, Error)]
pub enum SpoolError {
    #[error("spool {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("spool {path}: not a volley spool segment (bad magic or version); move it away or use another --spool")]
    BadSegment { path: PathBuf },
    #[error("spool {path}: record of {len} octets is over the {RECORD_MAX} limit")]
    RecordTooLarge { path: PathBuf, len: usize },
    #[error("spool {path}: disk full: cannot preallocate a {bytes}-octet segment; free space or move --spool")]
    DiskFull { path: PathBuf, bytes: u64 },
}

fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> SpoolError + 'a {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// Where a Queue record lives: the recipient's identity inside the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordRef {
    pub seg: u32,
    pub off: u32,
}

/// One recipient of a campaign instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueRecord {
    pub instance: u32,
    /// Line in recipients.csv, for the log and for error messages.
    pub line: u32,
    /// Merge values in recipients.csv column order.
    pub values: Vec<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Terminal {
    Delivered = 1,
    Bounced = 2,
    Expired = 3,
    /// The campaign instance was never acknowledged (ingest did not finish).
    Abandoned = 4,
}

impl QueueRecord {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(KIND_QUEUE);
        out.extend_from_slice(&self.instance.to_le_bytes());
        out.extend_from_slice(&self.line.to_le_bytes());
        out.extend_from_slice(&(self.values.len() as u16).to_le_bytes());
        for v in &self.values {
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(v);
        }
    }

    pub fn decode(b: &[u8]) -> Option<QueueRecord> {
        let mut r = Reader(b);
        if r.u8()? != KIND_QUEUE {
            return None;
        }
        let instance = r.u32()?;
        let line = r.u32()?;
        let n = r.u16()? as usize;
        let mut values = Vec::with_capacity(n);
        for _ in 0..n {
            let len = r.u32()? as usize;
            values.push(r.take(len)?.to_vec());
        }
        Some(QueueRecord {
            instance,
            line,
            values,
        })
    }
}

/// A Queue record read in place: its instance and the i-th merge value, no allocation.
fn queue_instance(payload: &[u8]) -> Option<u32> {
    let mut r = Reader(payload);
    if r.u8()? != KIND_QUEUE {
        return None;
    }
    let instance = r.u32()?;
    r.u32()?;
    let n = r.u16()?;
    for _ in 0..n {
        let len = r.u32()? as usize;
        r.take(len)?;
    }
    r.0.is_empty().then_some(instance)
}

fn queue_value(payload: &[u8], i: usize) -> Option<&[u8]> {
    let mut r = Reader(payload);
    r.take(9)?;
    let n = r.u16()? as usize;
    if i >= n {
        return None;
    }
    for _ in 0..i {
        let len = r.u32()? as usize;
        r.take(len)?;
    }
    let len = r.u32()? as usize;
    r.take(len)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
}

/// Kind, record location, attempts, due time; then (version 3) the last reply.
const DEFER_BYTES: usize = 21;

/// Longest reply text kept on a Defer record; longer texts are cut at a character
/// boundary (the accounting log has the whole reply of every attempt).
pub const DEFER_REPLY_TEXT_MAX: usize = 1024;

/// The Queue record a Done or Defer record names.
fn record_ref(payload: &[u8]) -> RecordRef {
    RecordRef {
        seg: u32::from_le_bytes(payload[1..5].try_into().unwrap()),
        off: u32::from_le_bytes(payload[5..9].try_into().unwrap()),
    }
}

fn done_payload(r: RecordRef, t: Terminal) -> [u8; 10] {
    let mut p = [0u8; 10];
    p[0] = KIND_DONE;
    p[1..5].copy_from_slice(&r.seg.to_le_bytes());
    p[5..9].copy_from_slice(&r.off.to_le_bytes());
    p[9] = t as u8;
    p
}

struct Segment {
    no: u32,
    path: PathBuf,
    map: MmapMut,
    queued: u32,
    done: u32,
}

/// One shard's spool directory.
pub struct Spool {
    dir: PathBuf,
    segment_bytes: usize,
    /// Oldest first; the last one is being written.
    segs: VecDeque<Segment>,
    /// Write position in the last segment.
    write_off: usize,
    /// Start of the range not yet synced in the last segment.
    synced_off: usize,
    /// Segments filled since the last sync (synced whole at the next sync).
    unsynced_full: Vec<u32>,
}

/// A recipient's last temporary failure, kept so a restart neither retries it early
/// nor starts its retry schedule over, and an expiration reports the real reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deferral {
    pub attempts: u32,
    /// When the next attempt is due, in milliseconds since the Unix epoch.
    pub due_unix_ms: u64,
    /// What the last attempt got (None on records of version-2 segments); shared
    /// with the recipient's job, which carries it to an expiration.
    pub last: Option<std::rc::Rc<LastReply>>,
}

/// The reply of a recipient's last real attempt (RFC 3464 §2.3.6: a DSN's
/// Diagnostic-Code and Last-Attempt-Date).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastReply {
    /// When the attempt was answered, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    pub code: u16,
    pub enhanced: Option<String>,
    /// At most DEFER_REPLY_TEXT_MAX octets.
    pub text: String,
    /// Where it came from: dns, connect, mail, rcpt, data.
    pub stage: String,
}

impl LastReply {
    /// Appends the encoding: at, code, then enhanced, text and stage each with a
    /// u16 length.
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.at_unix_ms.to_le_bytes());
        out.extend_from_slice(&self.code.to_le_bytes());
        let mut cut = self.text.len().min(DEFER_REPLY_TEXT_MAX);
        while !self.text.is_char_boundary(cut) {
            cut -= 1;
        }
        let text = &self.text[..cut];
        for part in [self.enhanced.as_deref().unwrap_or(""), text, &self.stage] {
            out.extend_from_slice(&(part.len() as u16).to_le_bytes());
            out.extend_from_slice(part.as_bytes());
        }
    }

    /// None when `b` is not a whole encoding (a corrupt record).
    fn decode(b: &[u8]) -> Option<LastReply> {
        let mut r = Reader(b);
        let at_unix_ms = u64::from_le_bytes(r.take(8)?.try_into().ok()?);
        let code = u16::from_le_bytes(r.take(2)?.try_into().ok()?);
        let mut part = || -> Option<String> {
            let n = u16::from_le_bytes(r.take(2)?.try_into().ok()?) as usize;
            String::from_utf8(r.take(n)?.to_vec()).ok()
        };
        let (enhanced, text, stage) = (part()?, part()?, part()?);
        Some(LastReply {
            at_unix_ms,
            code,
            enhanced: (!enhanced.is_empty()).then_some(enhanced),
            text,
            stage,
        })
    }
}

/// A recipient recovery found still to deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRecord {
    pub rref: RecordRef,
    pub instance: u32,
    /// None: never attempted (or only cut off before a reply).
    pub deferral: Option<Deferral>,
}

/// What recovery found: the recipients still to deliver, in spool order.
pub struct Recovered {
    /// Read the values with `queue_value`/`read_queue`.
    pub pending: Vec<PendingRecord>,
    /// A torn or corrupt record ended a segment early (its location).
    pub torn_at: Option<(u32, usize)>,
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir` and recovers it. `acked` says
    /// whether a campaign instance was acknowledged; records of others are
    /// abandoned (marked Done) so their segments can be deleted.
    pub fn open(
        dir: &Path,
        segment_bytes: usize,
        acked: &dyn Fn(u32) -> bool,
    ) -> Result<(Spool, Recovered), SpoolError> {
        std::fs::create_dir_all(dir).map_err(io(dir, "create directory"))?;
        let mut stale = Vec::new();
        let mut nos: Vec<u32> = std::fs::read_dir(dir)
            .map_err(io(dir, "list"))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let n = e.file_name().into_string().ok()?;
                if n.starts_with("seg-") && n.ends_with(NEW_SEGMENT_SUFFIX) {
                    stale.push(e.path());
                    return None;
                }
                n.strip_prefix("seg-")?
                    .strip_suffix(".vspool")?
                    .parse()
                    .ok()
            })
            .collect();
        nos.sort_unstable();
        // Segments whose making a crash cut short: never linked, never written to.
        for path in stale {
            std::fs::remove_file(&path).map_err(io(&path, "remove"))?;
            eprintln!(
                "volley: {}: a segment being made when volley stopped; removed",
                path.display()
            );
        }
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            segment_bytes,
            segs: VecDeque::new(),
            write_off: SEG_HEADER_BYTES,
            synced_off: SEG_HEADER_BYTES,
            unsynced_full: Vec::new(),
        };
        // Locations only: a million recipients must not mean a million decoded records.
        let mut queue: Vec<(RecordRef, u32)> = Vec::new();
        let mut done: std::collections::HashSet<RecordRef> = std::collections::HashSet::new();
        let mut deferred: std::collections::HashMap<RecordRef, Deferral> =
            std::collections::HashMap::new();
        let mut torn_at = None;
        let mut last_version = VERSION;
        // Whether the newest segment was opened for appending (not so when the newest
        // file was a never-written one, removed).
        let mut appending = false;
        for (i, &no) in nos.iter().enumerate() {
            let path = spool.seg_path(no);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io(&path, "open segment"))?;
            // An empty file (cannot be mapped) was made and never sized.
            if file.metadata().map_err(io(&path, "stat"))?.len() == 0 {
                remove_never_written(&path)?;
                continue;
            }
            // SAFETY: the spool directory belongs to this process (the engine holds an
            // exclusive flock on it) and segment files are never truncated while mapped.
            let map = unsafe { MmapMut::map_mut(&file) }.map_err(io(&path, "map segment"))?;
            let version = (map.len() >= SEG_HEADER_BYTES && &map[..8] == MAGIC)
                .then(|| u32::from_le_bytes(map[8..12].try_into().unwrap()));
            match version {
                Some(v @ 1..=VERSION) => last_version = v,
                None if never_written(&map) => {
                    drop(map);
                    remove_never_written(&path)?;
                    continue;
                }
                _ => return Err(SpoolError::BadSegment { path }),
            }
            let mut off = SEG_HEADER_BYTES;
            let last = i + 1 == nos.len();
            loop {
                match read_frame(&map, off) {
                    Frame::End => break,
                    Frame::Torn => {
                        torn_at.get_or_insert((no, off));
                        break;
                    }
                    Frame::Record(payload) => {
                        let here = RecordRef {
                            seg: no,
                            off: off as u32,
                        };
                        match payload.first() {
                            Some(&KIND_QUEUE) => match queue_instance(payload) {
                                Some(instance) => queue.push((here, instance)),
                                None => {
                                    torn_at.get_or_insert((no, off));
                                    break;
                                }
                            },
                            Some(&KIND_DONE) if payload.len() == 10 => {
                                done.insert(record_ref(payload));
                            }
                            Some(&KIND_DEFER) if payload.len() >= DEFER_BYTES => {
                                let attempts = payload[9..13].try_into().unwrap();
                                let due = payload[13..21].try_into().unwrap();
                                let tail = &payload[DEFER_BYTES..];
                                let last = match tail.is_empty() {
                                    true => None,
                                    false => match LastReply::decode(tail) {
                                        Some(l) => Some(std::rc::Rc::new(l)),
                                        None => {
                                            torn_at.get_or_insert((no, off));
                                            break;
                                        }
                                    },
                                };
                                deferred.insert(
                                    record_ref(payload),
                                    Deferral {
                                        attempts: u32::from_le_bytes(attempts),
                                        due_unix_ms: u64::from_le_bytes(due),
                                        last,
                                    },
                                );
                            }
                            _ => {
                                torn_at.get_or_insert((no, off));
                                break;
                            }
                        }
                        off += FRAME_BYTES + payload.len();
                    }
                }
            }
            let mut map = map;
            if last {
                // Anything after the end of the valid records was never acknowledged: zero
                // it, so records appended here can't be followed by stale ones.
                zero_tail(&file, &mut map, off, &path)?;
                spool.write_off = off;
                spool.synced_off = off;
                appending = true;
            }
            spool.segs.push_back(Segment {
                no,
                path,
                map,
                queued: 0,
                done: 0,
            });
        }
        let mut pending = Vec::new();
        let mut abandoned = Vec::new();
        for (r, instance) in queue {
            let seg = spool.seg_mut(r.seg).expect("segment just loaded");
            seg.queued += 1;
            if done.contains(&r) {
                seg.done += 1;
            } else if !acked(instance) {
                abandoned.push(r);
            } else {
                pending.push(PendingRecord {
                    rref: r,
                    instance,
                    deferral: deferred.remove(&r),
                });
            }
        }
        match spool.segs.back() {
            None => spool.new_segment(1, segment_bytes)?,
            Some(last) if last_version < VERSION || !appending => {
                let next = last.no + 1;
                spool.new_segment(next, segment_bytes)?;
            }
            Some(_) => {}
        }
        for r in abandoned {
            spool.append_done(r, Terminal::Abandoned)?;
        }
        spool.sync()?;
        spool.delete_finished()?;
        Ok((spool, Recovered { pending, torn_at }))
    }

    fn seg_path(&self, no: u32) -> PathBuf {
        self.dir.join(format!("seg-{no:08}.vspool"))
    }

    fn seg_mut(&mut self, no: u32) -> Option<&mut Segment> {
        let first = self.segs.front()?.no;
        self.segs
            .get_mut(no.checked_sub(first)? as usize)
            .filter(|s| s.no == no)
    }

    /// Opens segment `no`, preallocated to `bytes`. It is made under a temporary
    /// name (`seg-N.vspool.new`) and linked into place once its header is on disk, so
    /// a crash while making it leaves no segment without a header (which `open` would
    /// refuse), only a temporary file `open` removes. Errors: the file cannot be made
    /// (the disk full: `DiskFull`), or segment `no` exists already.
    fn new_segment(&mut self, no: u32, bytes: usize) -> Result<(), SpoolError> {
        let path = self.seg_path(no);
        let tmp = new_segment_path(&path);
        let made = self.make_segment(no, bytes, &tmp, &path);
        // Whatever happened, the temporary name goes: linked, it is a second name.
        let _ = std::fs::remove_file(&tmp);
        let map = made?;
        // The new file's directory entries must be durable too.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir, "fsync directory"))?;
        if let Some(prev) = self.segs.back() {
            self.unsynced_full.push(prev.no);
        }
        self.segs.push_back(Segment {
            no,
            path,
            map,
            queued: 0,
            done: 0,
        });
        self.write_off = SEG_HEADER_BYTES;
        self.synced_off = SEG_HEADER_BYTES;
        Ok(())
    }

    /// Makes segment `no` at `tmp` with its header synced, then links it at `path`
    /// (a hard link: it fails, atomically, where a segment already is).
    fn make_segment(
        &self,
        no: u32,
        bytes: usize,
        tmp: &Path,
        path: &Path,
    ) -> Result<MmapMut, SpoolError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(tmp)
            .map_err(io(tmp, "create segment"))?;
        preallocate(&file, bytes as u64, tmp)?;
        // SAFETY: as in `open`: the file is ours alone and never truncated while mapped.
        let mut map = unsafe { MmapMut::map_mut(&file) }.map_err(io(tmp, "map segment"))?;
        map[..8].copy_from_slice(MAGIC);
        map[8..12].copy_from_slice(&VERSION.to_le_bytes());
        map[12..16].copy_from_slice(&no.to_le_bytes());
        map.flush_range(0, SEG_HEADER_BYTES)
            .map_err(io(tmp, "msync"))?;
        std::fs::hard_link(tmp, path).map_err(io(path, "link new segment"))?;
        Ok(map)
    }

    fn append(&mut self, payload: &[u8]) -> Result<RecordRef, SpoolError> {
        if payload.len() > RECORD_MAX {
            return Err(SpoolError::RecordTooLarge {
                path: self.dir.clone(),
                len: payload.len(),
            });
        }
        let need = FRAME_BYTES + payload.len();
        let room = self.segs.back().map_or(0, |s| s.map.len());
        if self.write_off + need > room {
            let next = self.segs.back().map_or(1, |s| s.no + 1);
            let bytes = self.segment_bytes.max(SEG_HEADER_BYTES + need);
            self.new_segment(next, bytes)?;
        }
        let off = self.write_off;
        let seg = self.segs.back_mut().expect("a segment is always open");
        let crc = crc32c::crc32c(payload);
        // Payload first, then the frame: a kill between the two leaves a zero length,
        // which recovery reads as the end, never as a record with a stale payload.
        seg.map[off + FRAME_BYTES..off + need].copy_from_slice(payload);
        seg.map[off + 4..off + 8].copy_from_slice(&crc.to_le_bytes());
        seg.map[off..off + 4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        self.write_off += need;
        Ok(RecordRef {
            seg: seg.no,
            off: off as u32,
        })
    }

    pub fn append_queue(
        &mut self,
        q: &QueueRecord,
        scratch: &mut Vec<u8>,
    ) -> Result<RecordRef, SpoolError> {
        scratch.clear();
        q.encode(scratch);
        let r = self.append(scratch)?;
        self.segs.back_mut().expect("open").queued += 1;
        Ok(r)
    }

    /// Records a temporary failure of `r` (of several, recovery takes the last).
    pub fn append_defer(&mut self, r: RecordRef, d: &Deferral) -> Result<(), SpoolError> {
        let mut p = Vec::with_capacity(DEFER_BYTES + 64);
        p.push(KIND_DEFER);
        p.extend_from_slice(&r.seg.to_le_bytes());
        p.extend_from_slice(&r.off.to_le_bytes());
        p.extend_from_slice(&d.attempts.to_le_bytes());
        p.extend_from_slice(&d.due_unix_ms.to_le_bytes());
        if let Some(last) = &d.last {
            last.encode(&mut p);
        }
        self.append(&p).map(|_| ())
    }

    pub fn append_done(&mut self, r: RecordRef, t: Terminal) -> Result<(), SpoolError> {
        self.append(&done_payload(r, t))?;
        if let Some(seg) = self.seg_mut(r.seg) {
            seg.done += 1;
        }
        Ok(())
    }

    fn payload(&self, r: RecordRef) -> Option<&[u8]> {
        let first = self.segs.front()?.no;
        let seg = self.segs.get(r.seg.checked_sub(first)? as usize)?;
        match read_frame(&seg.map, r.off as usize) {
            Frame::Record(p) => Some(p),
            _ => None,
        }
    }

    /// Reads a Queue record back (from the mapping: no syscall).
    pub fn read_queue(&self, r: RecordRef) -> Option<QueueRecord> {
        QueueRecord::decode(self.payload(r)?)
    }

    /// The i-th merge value of a Queue record, in place.
    pub fn queue_value(&self, r: RecordRef, i: usize) -> Option<&[u8]> {
        queue_value(self.payload(r)?, i)
    }

    /// Makes everything appended so far durable.
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        for no in std::mem::take(&mut self.unsynced_full) {
            if let Some(seg) = self.seg_mut(no) {
                seg.map.flush().map_err(io(&seg.path, "msync"))?;
            }
        }
        if self.write_off > self.synced_off {
            let seg = self.segs.back().expect("open");
            seg.map
                .flush_range(self.synced_off, self.write_off - self.synced_off)
                .map_err(io(&seg.path, "msync"))?;
            self.synced_off = self.write_off;
        }
        Ok(())
    }

    /// Deletes the oldest segments whose recipients are all done (never the open one).
    pub fn delete_finished(&mut self) -> Result<usize, SpoolError> {
        let mut n = 0;
        while self.segs.len() > 1 {
            let front = self.segs.front().expect("len > 1");
            if front.done < front.queued {
                break;
            }
            let seg = self.segs.pop_front().expect("len > 1");
            self.unsynced_full.retain(|&x| x != seg.no);
            std::fs::remove_file(&seg.path).map_err(io(&seg.path, "delete finished segment"))?;
            n += 1;
        }
        Ok(n)
    }

    pub fn segment_count(&self) -> usize {
        self.segs.len()
    }

    /// Octets the segments take on disk (each is its full mapped size).
    pub fn bytes(&self) -> u64 {
        self.segs.iter().map(|s| s.map.len() as u64).sum()
    }
}

enum Frame<'a> {
    Record(&'a [u8]),
    /// A zero length: nothing was written here.
    End,
    /// A length that does not fit or a crc that does not match.
    Torn,
}

fn read_frame(map: &[u8], off: usize) -> Frame<'_> {
    if off + FRAME_BYTES > map.len() {
        return Frame::End;
    }
    let len = u32::from_le_bytes(map[off..off + 4].try_into().unwrap()) as usize;
    if len == 0 {
        return Frame::End;
    }
    if len > RECORD_MAX || off + FRAME_BYTES + len > map.len() {
        return Frame::Torn;
    }
    let crc = u32::from_le_bytes(map[off + 4..off + 8].try_into().unwrap());
    let payload = &map[off + FRAME_BYTES..off + FRAME_BYTES + len];
    if crc32c::crc32c(payload) != crc {
        return Frame::Torn;
    }
    Frame::Record(payload)
}

/// Zeroes `map[off..]` on disk. FALLOC_FL_ZERO_RANGE does it without touching the
/// pages (a 64 MiB fill would fault every page into memory); filesystems without it
/// get the fill.
fn zero_tail(file: &File, map: &mut MmapMut, off: usize, path: &Path) -> Result<(), SpoolError> {
    let len = map.len() - off;
    if len == 0 {
        return Ok(());
    }
    // SAFETY: plain syscall on a valid, owned descriptor; the range is inside the file.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_ZERO_RANGE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        return file.sync_data().map_err(io(path, "fdatasync"));
    }
    map[off..].fill(0);
    map.flush().map_err(io(path, "msync"))
}

/// The suffix of the name a segment is made under before it is linked into place.
const NEW_SEGMENT_SUFFIX: &str = ".new";

fn new_segment_path(seg: &Path) -> PathBuf {
    let mut name = seg.as_os_str().to_owned();
    name.push(NEW_SEGMENT_SUFFIX);
    PathBuf::from(name)
}

/// Whether a segment whose header is not volley's was made but never written: all
/// zeros where the header and the first record would be, or shorter and all zeros
/// (a crash between creating the file, sizing it and writing its header, as builds
/// before the temporary name could leave).
fn never_written(map: &[u8]) -> bool {
    map[..map.len().min(SEG_HEADER_BYTES + FRAME_BYTES)]
        .iter()
        .all(|&b| b == 0)
}

/// Removes a segment `never_written` found, with a notice.
fn remove_never_written(path: &Path) -> Result<(), SpoolError> {
    std::fs::remove_file(path).map_err(io(path, "remove"))?;
    eprintln!(
        "volley: {}: a segment made but never written (a crash while making it); removed",
        path.display()
    );
    Ok(())
}

/// Allocates the blocks now: a sparse file would fault with SIGBUS on a full disk
/// when the mapping is first written, instead of failing here with ENOSPC.
fn preallocate(file: &File, bytes: u64, path: &Path) -> Result<(), SpoolError> {
    // SAFETY: plain syscall on a valid, owned descriptor.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, bytes as libc::off_t) };
    match rc {
        0 => Ok(()),
        libc::ENOSPC => {
            let _ = std::fs::remove_file(path);
            Err(SpoolError::DiskFull {
                path: path.to_path_buf(),
                bytes,
            })
        }
        e => Err(SpoolError::Io {
            path: path.to_path_buf(),
            op: "preallocate",
            source: std::io::Error::from_raw_os_error(e),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("volley-spool-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn rec(i: u32) -> QueueRecord {
        QueueRecord {
            instance: 1,
            line: i + 2,
            values: vec![format!("u{i}@x.test").into_bytes(), b"Ann".to_vec()],
        }
    }

    #[test]
    fn recovers_pending_and_deletes_finished_segments() {
        let d = dir("recover");
        let seg = 4096;
        let mut scratch = Vec::new();
        let refs: Vec<RecordRef> = {
            let (mut s, r) = Spool::open(&d, seg, &|_| true).unwrap();
            assert!(r.pending.is_empty());
            let refs: Vec<_> = (0..200)
                .map(|i| s.append_queue(&rec(i), &mut scratch).unwrap())
                .collect();
            s.sync().unwrap();
            assert!(s.segment_count() >= 2, "small segments roll over");
            for r in &refs[..150] {
                s.append_done(*r, Terminal::Delivered).unwrap();
            }
            s.sync().unwrap();
            refs
        };
        let (mut s, r) = Spool::open(&d, seg, &|_| true).unwrap();
        assert_eq!(r.pending.len(), 50);
        let first = r.pending[0].rref;
        assert_eq!(first, refs[150]);
        assert_eq!(r.pending[0].instance, 1);
        assert_eq!(s.read_queue(first), Some(rec(150)));
        assert_eq!(s.queue_value(first, 1), Some(&b"Ann"[..]));
        assert_eq!(s.queue_value(first, 2), None);
        assert_eq!(s.read_queue(refs[199]), Some(rec(199)));
        for p in &r.pending {
            s.append_done(p.rref, Terminal::Bounced).unwrap();
        }
        s.delete_finished().unwrap();
        assert_eq!(s.segment_count(), 1, "all but the open segment deleted");
        drop(s);
        let (_, r) = Spool::open(&d, seg, &|_| true).unwrap();
        assert!(r.pending.is_empty());
    }

    /// A crash between creating a segment file and writing its header (what a SIGKILL
    /// during ingest did before segments were renamed into place) must not stop the
    /// next start: the never-written segment and a stale temporary are removed, what
    /// was queued before stays pending, and appending goes on in a fresh segment.
    #[test]
    fn a_segment_made_but_never_written_is_removed_and_nothing_queued_is_lost() {
        let d = dir("never-written");
        let mut scratch = Vec::new();
        {
            let (mut s, _) = Spool::open(&d, 1 << 20, &|_| true).unwrap();
            for i in 0..10 {
                s.append_queue(&rec(i), &mut scratch).unwrap();
            }
            s.sync().unwrap();
        }
        // As the crash left them: segment 2 preallocated and all zeros, and a
        // temporary of segment 3.
        std::fs::write(d.join("seg-00000002.vspool"), vec![0u8; 1 << 16]).unwrap();
        std::fs::write(d.join("seg-00000003.vspool.new"), vec![0u8; 1 << 16]).unwrap();
        // And one created but not yet sized (an empty file).
        std::fs::write(d.join("seg-00000004.vspool"), b"").unwrap();
        let (mut s, r) = Spool::open(&d, 1 << 20, &|_| true).unwrap();
        assert_eq!(r.pending.len(), 10);
        assert!(!d.join("seg-00000003.vspool.new").exists());
        assert!(!d.join("seg-00000004.vspool").exists());
        let after = s.append_queue(&rec(10), &mut scratch).unwrap();
        assert_eq!(
            after.seg, 2,
            "appended in a fresh segment 2, not in the full 1"
        );
        s.sync().unwrap();
        drop(s);
        let (s, r) = Spool::open(&d, 1 << 20, &|_| true).unwrap();
        assert_eq!(r.pending.len(), 11);
        assert_eq!(s.read_queue(after), Some(rec(10)));
        // A header that is neither volley's nor zeros is still refused.
        drop(s);
        std::fs::write(d.join("seg-00000009.vspool"), vec![7u8; 1 << 16]).unwrap();
        assert!(matches!(
            Spool::open(&d, 1 << 20, &|_| true),
            Err(SpoolError::BadSegment { .. })
        ));
    }

    #[test]
    fn torn_record_ends_recovery_and_unacked_instances_are_abandoned() {
        let d = dir("torn");
        let mut scratch = Vec::new();
        {
            let (mut s, _) = Spool::open(&d, 1 << 20, &|_| true).unwrap();
            for i in 0..10 {
                s.append_queue(&rec(i), &mut scratch).unwrap();
            }
            let mut other = rec(99);
            other.instance = 7;
            s.append_queue(&other, &mut scratch).unwrap();
            s.sync().unwrap();
        }
        // Flip a byte in the 6th record's payload.
        let path = d.join("seg-00000001.vspool");
        let mut bytes = std::fs::read(&path).unwrap();
        let mut off = SEG_HEADER_BYTES;
        for _ in 0..5 {
            off +=
                FRAME_BYTES + u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
        }
        bytes[off + FRAME_BYTES + 3] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        let (_, r) = Spool::open(&d, 1 << 20, &|i| i == 1).unwrap();
        assert_eq!(r.pending.len(), 5);
        assert_eq!(r.torn_at, Some((1, off)));
        // Records after the tear are gone for good, and instance 7 was never acked.
        let (_, r) = Spool::open(&d, 1 << 20, &|_| true).unwrap();
        assert_eq!(r.pending.len(), 5);
        assert_eq!(r.torn_at, None);
    }

    #[test]
    fn deferrals_come_back_with_their_recipient_and_the_last_one_counts() {
        let d = dir("defer");
        let mut scratch = Vec::new();
        let at = |attempts, due_unix_ms| Deferral {
            attempts,
            due_unix_ms,
            last: None,
        };
        let refs: Vec<RecordRef> = {
            let (mut s, _) = Spool::open(&d, 1 << 20, &|_| true).unwrap();
            let refs: Vec<_> = (0..3)
                .map(|i| s.append_queue(&rec(i), &mut scratch).unwrap())
                .collect();
            s.append_defer(refs[0], &at(1, 1_000)).unwrap();
            s.append_defer(refs[1], &at(1, 2_000)).unwrap();
            s.append_defer(refs[0], &at(2, 5_000)).unwrap();
            s.append_done(refs[1], Terminal::Delivered).unwrap();
            s.sync().unwrap();
            refs
        };
        let (_, r) = Spool::open(&d, 1 << 20, &|_| true).unwrap();
        let pending = |rref, deferral| PendingRecord {
            rref,
            instance: 1,
            deferral,
        };
        assert_eq!(
            r.pending,
            vec![pending(refs[0], Some(at(2, 5_000))), pending(refs[2], None)]
        );
    }

    #[test]
    fn a_deferral_keeps_the_last_reply_cut_to_its_limit() {
        let d = dir("lastreply");
        let mut scratch = Vec::new();
        // Two octets each after one: the limit falls inside a character.
        let long = format!("a{}", "é".repeat(DEFER_REPLY_TEXT_MAX));
        let last = LastReply {
            at_unix_ms: 1_700_000_000_123,
            code: 452,
            enhanced: Some("4.2.2".into()),
            text: long.clone(),
            stage: "rcpt".into(),
        };
        let rref = {
            let (mut s, _) = Spool::open(&d, 1 << 20, &|_| true).unwrap();
            let r = s.append_queue(&rec(0), &mut scratch).unwrap();
            let deferral = Deferral {
                attempts: 3,
                due_unix_ms: 42,
                last: Some(std::rc::Rc::new(last.clone())),
            };
            s.append_defer(r, &deferral).unwrap();
            s.sync().unwrap();
            r
        };
        let (_, r) = Spool::open(&d, 1 << 20, &|_| true).unwrap();
        assert_eq!(r.pending[0].rref, rref);
        let got = (*r.pending[0].deferral.clone().unwrap().last.unwrap()).clone();
        assert_eq!(
            got.text,
            long[..DEFER_REPLY_TEXT_MAX - 1],
            "cut at the character boundary below the limit"
        );
        assert_eq!(
            LastReply {
                text: long[..DEFER_REPLY_TEXT_MAX - 1].to_string(),
                ..last
            },
            got
        );
    }

    #[test]
    fn a_version_1_segment_is_read_but_never_appended_to() {
        let d = dir("v1");
        let mut scratch = Vec::new();
        {
            let (mut s, _) = Spool::open(&d, 1 << 20, &|_| true).unwrap();
            s.append_queue(&rec(0), &mut scratch).unwrap();
            s.sync().unwrap();
        }
        let path = d.join("seg-00000001.vspool");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let (mut s, r) = Spool::open(&d, 1 << 20, &|_| true).unwrap();
        assert_eq!(r.pending.len(), 1);
        assert_eq!(
            s.segment_count(),
            2,
            "appends go to a new version-3 segment"
        );
        let deferral = Deferral {
            attempts: 1,
            due_unix_ms: 9,
            last: None,
        };
        s.append_defer(r.pending[0].rref, &deferral).unwrap();
        s.sync().unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "the old segment is untouched"
        );
        let (_, r) = Spool::open(&d, 1 << 20, &|_| true).unwrap();
        assert_eq!(r.pending[0].deferral, Some(deferral));
        bytes[8..12].copy_from_slice(&9u32.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            Spool::open(&d, 1 << 20, &|_| true),
            Err(SpoolError::BadSegment { .. })
        ));
    }
}
