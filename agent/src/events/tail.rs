//! Following the gateway's events file across rotation and truncation.
//!
//! The cursor names the file by identity (device and inode), not by path, with the offset of
//! the first byte not yet taken. When the path points at a new file, the rest of the old one
//! is read first from where it was rotated to (`<path>.1`); when the file shrank under the same
//! identity, it was truncated and reading starts again at its beginning. Only whole lines are
//! taken, so an event half-written at the moment of a read is taken whole on the next.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use kt_contract::MAX_EVENT_BYTES;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub dev: u64,
    pub ino: u64,
    pub offset: u64,
}

/// What one poll found.
#[derive(Debug, Default)]
pub struct Polled {
    /// Whole lines that are JSON objects, in file order.
    pub events: Vec<Vec<u8>>,
    /// Lines that were not valid JSON objects: counted and skipped.
    pub invalid: u64,
    /// Where the next poll starts; to be persisted together with the events.
    pub cursor: Cursor,
    /// True when the read stopped at `max_bytes`: poll again at once.
    pub more: bool,
}

pub struct Tailer {
    path: PathBuf,
    cursor: Cursor,
}

impl Tailer {
    pub fn new(path: PathBuf, cursor: Cursor) -> Self {
        Tailer { path, cursor }
    }

    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// Reads at most `max_bytes` of new whole lines. The cursor only moves once the caller
    /// `commit`s it, after storing the events.
    pub fn poll(&self, max_bytes: usize) -> std::io::Result<Polled> {
        let current = match std::fs::metadata(&self.path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Polled {
                    cursor: self.cursor,
                    ..Default::default()
                });
            }
            Err(e) => return Err(e),
        };
        let same_file = self.cursor.ino == current.ino() && self.cursor.dev == current.dev();
        if self.cursor.ino != 0 && !same_file {
            // Rotated: finish the old file if it is where rotation put it, then go on with the new one.
            let rotated = rotated_path(&self.path);
            let unread_rest = std::fs::metadata(&rotated).is_ok_and(|old| {
                old.ino() == self.cursor.ino
                    && old.dev() == self.cursor.dev
                    && old.len() > self.cursor.offset
            });
            if unread_rest {
                let mut polled = read_lines(&rotated, self.cursor, max_bytes, true)?;
                if !polled.more {
                    polled.cursor = Cursor {
                        dev: current.dev(),
                        ino: current.ino(),
                        offset: 0,
                    };
                    polled.more = true;
                }
                return Ok(polled);
            }
            return Ok(Polled {
                cursor: Cursor {
                    dev: current.dev(),
                    ino: current.ino(),
                    offset: 0,
                },
                more: true,
                ..Default::default()
            });
        }
        let mut cursor = Cursor {
            dev: current.dev(),
            ino: current.ino(),
            offset: if same_file { self.cursor.offset } else { 0 },
        };
        if current.len() < cursor.offset {
            // Truncated in place: start over at the beginning.
            cursor.offset = 0;
        }
        if current.len() == cursor.offset {
            return Ok(Polled {
                cursor,
                ..Default::default()
            });
        }
        read_lines(&self.path, cursor, max_bytes, false)
    }

    pub fn commit(&mut self, cursor: Cursor) {
        self.cursor = cursor;
    }
}

pub fn rotated_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// Reads whole lines from `cursor.offset`; lines over [`MAX_EVENT_BYTES`] are invalid; `finished` files also give up a last unterminated line.
fn read_lines(
    path: &Path,
    cursor: Cursor,
    max_bytes: usize,
    finished: bool,
) -> std::io::Result<Polled> {
    let mut file = std::fs::File::open(path)?;
    file.seek(SeekFrom::Start(cursor.offset))?;
    let mut buf = Vec::with_capacity(max_bytes.min(1 << 20));
    file.take(max_bytes as u64).read_to_end(&mut buf)?;
    let read_all = buf.len() < max_bytes;
    let end = match buf.iter().rposition(|b| *b == b'\n') {
        Some(i) => i + 1,
        None if finished && read_all => buf.len(),
        // A line longer than max_bytes can never be taken whole: skip it as invalid.
        None if !read_all => {
            return Ok(Polled {
                invalid: 1,
                cursor: Cursor {
                    offset: cursor.offset + buf.len() as u64,
                    ..cursor
                },
                more: true,
                ..Default::default()
            });
        }
        None => 0,
    };
    let mut polled = Polled {
        cursor: Cursor {
            offset: cursor.offset + end as u64,
            ..cursor
        },
        more: !read_all,
        ..Default::default()
    };
    for line in buf[..end].split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if line.first() == Some(&b'{')
            && line.len() <= MAX_EVENT_BYTES
            && serde_json::from_slice::<serde::de::IgnoredAny>(line).is_ok()
        {
            polled.events.push(line.to_vec());
        } else {
            polled.invalid += 1;
        }
    }
    Ok(polled)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn append(path: &Path, text: &str) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("open");
        f.write_all(text.as_bytes()).expect("write");
    }

    fn drain(t: &mut Tailer) -> (Vec<String>, u64) {
        let mut lines = Vec::new();
        let mut invalid = 0;
        loop {
            let polled = t.poll(64).expect("poll");
            lines.extend(
                polled
                    .events
                    .iter()
                    .map(|l| String::from_utf8_lossy(l).into_owned()),
            );
            invalid += polled.invalid;
            t.commit(polled.cursor);
            if !polled.more {
                return (lines, invalid);
            }
        }
    }

    #[test]
    fn partial_lines_wait_and_invalid_lines_are_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        let mut t = Tailer::new(path.clone(), Cursor::default());
        assert!(drain(&mut t).0.is_empty(), "no file yet");
        append(&path, "{\"n\":1}\nnot json\n{\"n\":2");
        assert_eq!(drain(&mut t), (vec!["{\"n\":1}".to_owned()], 1));
        append(&path, "}\n");
        assert_eq!(drain(&mut t).0, ["{\"n\":2}"]);
    }

    #[test]
    fn rotation_finishes_the_old_file_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        append(&path, "{\"n\":1}\n");
        let mut t = Tailer::new(path.clone(), Cursor::default());
        assert_eq!(drain(&mut t).0, ["{\"n\":1}"]);
        append(&path, "{\"n\":2}\n");
        std::fs::rename(&path, rotated_path(&path)).expect("rotate");
        append(&path, "{\"n\":3}\n");
        assert_eq!(drain(&mut t).0, ["{\"n\":2}", "{\"n\":3}"]);
    }

    #[test]
    fn truncation_starts_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        append(&path, "{\"n\":1}\n{\"n\":2}\n");
        let mut t = Tailer::new(path.clone(), Cursor::default());
        assert_eq!(drain(&mut t).0.len(), 2);
        std::fs::write(&path, "{\"n\":3}\n").expect("truncate");
        assert_eq!(drain(&mut t).0, ["{\"n\":3}"]);
    }

    #[test]
    fn an_overlong_line_is_skipped_not_stuck() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        append(
            &path,
            &format!("{{\"pad\":\"{}\"}}\n{{\"n\":1}}\n", "x".repeat(200)),
        );
        let mut t = Tailer::new(path, Cursor::default());
        let (lines, invalid) = drain(&mut t);
        assert_eq!(lines, ["{\"n\":1}"]);
        assert!(invalid >= 1);
    }
}
