//! A provider that takes no batch below a minimum of requests (Bedrock: 100 records per job)
//! cannot be sent a last shard of a few rows. [`BalancedTail`] sits between the shard cutter
//! and the sink: it holds back the last `min` lines of each shard and, while a new shard has
//! fewer than `min` lines, its lines too, so that when the render ends on a short shard the
//! lines it lacks can still be moved to it from the end of the shard before. Memory stays at
//! two times `min` lines; row order is kept; shard numbers and totals are unchanged.

use std::collections::VecDeque;

use crate::table::{ShardLimits, ShardSink, TableError};

/// A shard whose last lines are still held.
#[derive(Debug, Default)]
struct Held {
    number: u32,
    /// Every line of the shard, written or held.
    requests: u64,
    bytes: u64,
    lines: VecDeque<Vec<u8>>,
}

impl Held {
    fn push(&mut self, line: &[u8]) {
        self.requests += 1;
        self.bytes += line.len() as u64;
        self.lines.push_back(line.to_vec());
    }
}

/// See the module docs. Call [`BalancedTail::close`] once the render has ended.
#[derive(Debug)]
pub struct BalancedTail<'a, S> {
    inner: &'a mut S,
    limits: ShardLimits,
    /// The shard being filled.
    current: Held,
    /// A shard the cutter finished whose own finish waits until the shard after it reaches
    /// the minimum (or the render ends).
    previous: Option<Held>,
    /// A short shard the cutter finished after `previous`: the last one, unless more come.
    tail: Option<Held>,
}

impl<'a, S: ShardSink> BalancedTail<'a, S> {
    pub fn new(inner: &'a mut S, limits: ShardLimits) -> Self {
        Self {
            inner,
            limits,
            current: Held::default(),
            previous: None,
            tail: None,
        }
    }

    fn min(&self) -> usize {
        usize::try_from(self.limits.min_requests).unwrap_or(usize::MAX)
    }

    /// Writes what `held` still holds and finishes it.
    fn flush(&mut self, mut held: Held) -> Result<(), TableError> {
        for line in held.lines.drain(..) {
            self.inner.write_line(held.number, &line)?;
        }
        self.inner.finish(held.number, held.requests, held.bytes)
    }

    /// Ends the render: a short last shard takes the lines it lacks from the end of the one
    /// before, when that one keeps the minimum and the limits hold.
    pub fn close(mut self) -> Result<(), TableError> {
        match (self.previous.take(), self.tail.take()) {
            (Some(mut previous), Some(mut tail)) => {
                let need = self.min().saturating_sub(tail.lines.len());
                let moved_bytes: u64 = previous
                    .lines
                    .iter()
                    .rev()
                    .take(need)
                    .map(|l| l.len() as u64)
                    .sum();
                let fits = need <= previous.lines.len()
                    && previous.requests - need as u64 >= self.limits.min_requests
                    && tail.bytes + moved_bytes <= self.limits.max_bytes;
                if fits {
                    for _ in 0..need {
                        let Some(line) = previous.lines.pop_back() else {
                            break;
                        };
                        previous.requests -= 1;
                        previous.bytes -= line.len() as u64;
                        tail.requests += 1;
                        tail.bytes += line.len() as u64;
                        tail.lines.push_front(line);
                    }
                }
                self.flush(previous)?;
                self.flush(tail)
            }
            (Some(previous), None) => self.flush(previous),
            (None, _) => Ok(()),
        }
    }
}

impl<S: ShardSink> ShardSink for BalancedTail<'_, S> {
    fn write_line(&mut self, shard: u32, line: &[u8]) -> Result<(), TableError> {
        if let Some(tail) = self.tail.take() {
            // The short shard was not the last: it is sent as it is.
            if let Some(previous) = self.previous.take() {
                self.flush(previous)?;
            }
            self.previous = Some(tail);
        }
        self.current.number = shard;
        self.current.push(line);
        let min = self.min();
        if self.previous.is_some() {
            if self.current.lines.len() >= min
                && let Some(previous) = self.previous.take()
            {
                // This shard reaches the minimum: the one before is final.
                self.flush(previous)?;
            }
            return Ok(());
        }
        while self.current.lines.len() > min {
            if let Some(front) = self.current.lines.pop_front() {
                self.inner.write_line(shard, &front)?;
            }
        }
        Ok(())
    }

    fn finish(&mut self, shard: u32, requests: u64, bytes: u64) -> Result<(), TableError> {
        let mut done = std::mem::take(&mut self.current);
        done.number = shard;
        debug_assert_eq!((done.requests, done.bytes), (requests, bytes));
        if self.previous.is_some() {
            self.tail = Some(done);
        } else {
            self.previous = Some(done);
        }
        Ok(())
    }

    fn duplicate(&mut self, row_index: i64, first: i64) -> Result<(), TableError> {
        self.inner.duplicate(row_index, first)
    }

    fn cached(&mut self, row_index: i64, hash: u128) -> Result<(), TableError> {
        self.inner.cached(row_index, hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what reaches the sink: each shard's lines and its finish.
    #[derive(Debug, Default)]
    struct Recorder {
        lines: Vec<(u32, Vec<u8>)>,
        finished: Vec<(u32, u64, u64)>,
    }

    impl ShardSink for Recorder {
        fn write_line(&mut self, shard: u32, line: &[u8]) -> Result<(), TableError> {
            if let Some((open, _, _)) = self.finished.last() {
                assert!(shard > *open, "shard {shard} written after {open} finished");
            }
            self.lines.push((shard, line.to_vec()));
            Ok(())
        }
        fn finish(&mut self, shard: u32, requests: u64, bytes: u64) -> Result<(), TableError> {
            let written = self.lines.iter().filter(|(s, _)| *s == shard).count() as u64;
            assert_eq!(written, requests, "shard {shard}");
            self.finished.push((shard, requests, bytes));
            Ok(())
        }
        fn duplicate(&mut self, _: i64, _: i64) -> Result<(), TableError> {
            Ok(())
        }
        fn cached(&mut self, _: i64, _: u128) -> Result<(), TableError> {
            Ok(())
        }
    }

    /// Cuts `rows` one-byte lines at `max` as the cutter does, through a `BalancedTail`.
    fn cut(rows: u64, max: u64, min: u64) -> Recorder {
        let mut recorder = Recorder::default();
        let limits = ShardLimits {
            max_requests: max,
            max_bytes: u64::MAX,
            max_cell_bytes: u64::MAX,
            min_requests: min,
        };
        let mut balanced = BalancedTail::new(&mut recorder, limits);
        let (mut shard, mut in_shard, mut bytes) = (0, 0, 0);
        for row in 0..rows {
            if in_shard == max {
                balanced.finish(shard, in_shard, bytes).expect("finish");
                shard += 1;
                (in_shard, bytes) = (0, 0);
            }
            let line = row.to_string();
            balanced.write_line(shard, line.as_bytes()).expect("line");
            in_shard += 1;
            bytes += line.len() as u64;
        }
        if in_shard > 0 {
            balanced.finish(shard, in_shard, bytes).expect("finish");
        }
        balanced.close().expect("close");
        recorder
    }

    fn sizes(recorder: &Recorder) -> Vec<u64> {
        recorder.finished.iter().map(|(_, n, _)| *n).collect()
    }

    fn rows_in_order(recorder: &Recorder) -> Vec<u64> {
        recorder
            .lines
            .iter()
            .map(|(_, l)| String::from_utf8_lossy(l).parse().expect("row"))
            .collect()
    }

    #[test]
    fn a_short_last_shard_takes_what_it_lacks_from_the_one_before() {
        let recorder = cut(250, 200, 100);
        assert_eq!(sizes(&recorder), [150, 100]);
        assert_eq!(rows_in_order(&recorder), (0..250).collect::<Vec<_>>());
    }

    #[test]
    fn shards_at_or_above_the_minimum_are_left_as_cut() {
        assert_eq!(sizes(&cut(340, 120, 100)), [120, 120, 100]);
        assert_eq!(sizes(&cut(530, 200, 100)), [200, 200, 130]);
        let recorder = cut(1099, 200, 100);
        assert_eq!(sizes(&recorder), [200, 200, 200, 200, 199, 100]);
        assert_eq!(rows_in_order(&recorder), (0..1099).collect::<Vec<_>>());
        assert_eq!(sizes(&cut(240, 120, 100)), [120, 120]);
        assert_eq!(sizes(&cut(90, 120, 100)), [90]);
        let expected: Vec<u64> = [120; 8].iter().chain(&[40]).copied().collect();
        assert_eq!(sizes(&cut(1000, 120, 1)), expected);
    }

    #[test]
    fn a_tail_that_cannot_be_made_up_without_breaking_the_one_before_is_left_short() {
        // 150 + 10: moving 90 would leave 60 before it.
        assert_eq!(sizes(&cut(160, 150, 100)), [150, 10]);
    }
}
