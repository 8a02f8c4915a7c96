//! Tails read from the stream: one ordered consumer per tail, from `--since` (or from now), so
//! history and live events are one sequence with nothing between them. The subject is
//! narrowed to one gateway when the filter names just one; the other filters apply here. A
//! slow tail holds back only its own consumer (JetStream's flow control), never ingest or
//! another tail.

use tokio::sync::mpsc;
use tonic::Status;

use super::EventStream;
use super::log::subject_filter;
use super::read::{Reader, Start};
use super::wire;
use crate::events::tail::{TAIL_QUEUE, TailItems, TailRequest, TailSender, Tails};

pub struct StreamTails {
    pub stream: EventStream,
}

#[tonic::async_trait]
impl Tails for StreamTails {
    async fn tail(&self, request: TailRequest) -> Result<TailItems, String> {
        let start = match (request.since, request.follow) {
            (0, true) => Start::New,
            (0, false) => Start::All,
            (since, _) => Start::Time(since),
        };
        let mut reader = Reader::open(&self.stream, subject_filter(&request.filter), start).await?;
        let (tx, rx) = mpsc::channel(TAIL_QUEUE);
        let mut tail = TailSender::new(tx.clone(), request.limit, request.since);
        tokio::spawn(async move {
            if !request.follow && reader.pending_at_start == 0 {
                return;
            }
            loop {
                let read = tokio::select! {
                    // The operator went away while nothing was arriving.
                    _ = tx.closed() => return,
                    read = reader.next() => read,
                };
                let read = match read {
                    Ok(read) => read,
                    Err(why) => {
                        tail.fail(Status::unavailable(why)).await;
                        return;
                    }
                };
                for item in wire::published(&read.batch, read.at) {
                    if request.filter.matches_published(&item) && !tail.send(&item).await {
                        return;
                    }
                }
                if !request.follow && read.pending == 0 {
                    return;
                }
            }
        });
        Ok(rx)
    }
}
