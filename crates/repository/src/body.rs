//! Reading object bodies in large chunks. `GetResult::into_stream` reads a local file 8 KiB at
//! a time, each read a separate blocking task; a snapshot of 500 MB then spends its time
//! scheduling 60,000 tasks. We read local files 1 MiB at a time instead.

use std::io::{Read, Seek, SeekFrom};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::{GetResult, GetResultPayload};

const READ_CHUNK: u64 = 1 << 20;

pub(crate) fn body_stream(got: GetResult) -> BoxStream<'static, object_store::Result<Bytes>> {
    let range = got.range.clone();
    match got.payload {
        GetResultPayload::File(file, path) => futures::stream::try_unfold(
            (Some(file), path, range.start, range.end, false),
            |(file, path, pos, end, positioned)| async move {
                let Some(file) = file else {
                    return Ok(None);
                };
                if pos >= end {
                    return Ok(None);
                }
                let shown = path.clone();
                let read = tokio::task::spawn_blocking(move || {
                    let mut file = file;
                    if !positioned {
                        file.seek(SeekFrom::Start(pos))?;
                    }
                    let want = (end - pos).min(READ_CHUNK);
                    let mut buf = Vec::with_capacity(want as usize);
                    (&mut file).take(want).read_to_end(&mut buf)?;
                    if buf.is_empty() {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "the file is shorter than its listed size",
                        ));
                    }
                    Ok((file, buf))
                })
                .await;
                let (file, buf) = match read {
                    Ok(Ok(done)) => done,
                    Ok(Err(e)) => return Err(local_error(format!("read {}", shown.display()), e)),
                    Err(e) => return Err(local_error(format!("read {}", shown.display()), e)),
                };
                let next = pos + buf.len() as u64;
                Ok(Some((
                    Bytes::from(buf),
                    (Some(file), path, next, end, true),
                )))
            },
        )
        .boxed(),
        GetResultPayload::Stream(stream) => stream,
    }
}

fn local_error(
    what: String,
    source: impl std::error::Error + Send + Sync + 'static,
) -> object_store::Error {
    object_store::Error::Generic {
        store: "LocalFileSystem",
        source: format!("{what}: {source}").into(),
    }
}
