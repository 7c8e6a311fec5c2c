//! Decompressing a layer blob into its tar stream, and hashing that stream into the diff id.

use std::io::{self, BufRead, BufReader, Read};

use flate2::read::MultiGzDecoder;
use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};
use sha2::{Digest, Sha256};

use super::Compression;

/// Read buffer for the compressed input.
const INPUT_BUFFER: usize = 64 * 1024;

/// The tar stream of a layer blob.
pub(super) enum Decoder<R: Read> {
    Plain(BufReader<R>),
    // Boxed: both decoders' states are large (zlib-rs keeps its window inline).
    Gzip(Box<MultiGzDecoder<BufReader<R>>>),
    Zstd(Box<ZstdReader<R>>),
}

impl<R: Read> std::fmt::Debug for Decoder<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Decoder::Plain(_) => "Decoder::Plain",
            Decoder::Gzip(_) => "Decoder::Gzip",
            Decoder::Zstd(_) => "Decoder::Zstd",
        })
    }
}

impl<R: Read> Decoder<R> {
    pub(super) fn new(input: R, compression: Compression) -> Decoder<R> {
        let input = BufReader::with_capacity(INPUT_BUFFER, input);
        match compression {
            Compression::None => Decoder::Plain(input),
            // Multi-member, like Go's gzip reader that containerd and Docker use.
            Compression::Gzip => Decoder::Gzip(Box::new(MultiGzDecoder::new(input))),
            Compression::Zstd => Decoder::Zstd(Box::new(ZstdReader::new(input))),
        }
    }
}

impl<R: Read> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoder::Plain(r) => r.read(buf),
            Decoder::Gzip(r) => r.read(buf),
            Decoder::Zstd(r) => r.read(buf),
        }
    }
}

/// A zstd stream of any number of frames (skippable frames are skipped), with each frame's
/// content checksum verified when it has one.
pub(super) struct ZstdReader<R: Read> {
    input: BufReader<R>,
    decoder: FrameDecoder,
    in_frame: bool,
    frames: u64,
}

impl<R: Read> ZstdReader<R> {
    fn new(input: BufReader<R>) -> ZstdReader<R> {
        ZstdReader {
            input,
            decoder: FrameDecoder::new(),
            in_frame: false,
            frames: 0,
        }
    }

    /// Starts the next frame; `false` at the clean end of the stream.
    fn next_frame(&mut self) -> io::Result<bool> {
        loop {
            if self.input.fill_buf()?.is_empty() {
                if self.frames == 0 {
                    return Err(invalid("the zstd stream is empty"));
                }
                return Ok(false);
            }
            match self.decoder.reset(&mut self.input) {
                Ok(()) => {
                    self.in_frame = true;
                    self.frames += 1;
                    return Ok(true);
                }
                Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame {
                    length,
                    ..
                })) => {
                    let wanted = u64::from(length);
                    let skipped = io::copy(&mut (&mut self.input).take(wanted), &mut io::sink())?;
                    if skipped != wanted {
                        return Err(truncated());
                    }
                }
                Err(e) => return Err(zstd_error(e)),
            }
        }
    }

    /// Ends the current frame, checking its content checksum.
    fn end_frame(&mut self) -> io::Result<()> {
        self.in_frame = false;
        match (
            self.decoder.get_checksum_from_data(),
            self.decoder.get_calculated_checksum(),
        ) {
            (Some(stored), Some(computed)) if stored != computed => Err(invalid(
                "a zstd frame's content checksum does not match its data",
            )),
            _ => Ok(()),
        }
    }
}

impl<R: Read> Read for ZstdReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if !self.in_frame && !self.next_frame()? {
                return Ok(0);
            }
            while self.decoder.can_collect() < buf.len() && !self.decoder.is_finished() {
                let wanted = buf.len() - self.decoder.can_collect();
                self.decoder
                    .decode_blocks(&mut self.input, BlockDecodingStrategy::UptoBytes(wanted))
                    .map_err(zstd_error)?;
            }
            let n = self.decoder.read(buf)?;
            if n > 0 {
                return Ok(n);
            }
            if self.decoder.is_finished() {
                self.end_frame()?;
            } else {
                // Not finished yet nothing to collect: decode_blocks made no progress.
                return Err(truncated());
            }
        }
    }
}

fn zstd_error(e: FrameDecoderError) -> io::Error {
    invalid(format!("invalid or truncated zstd data: {e}"))
}

fn truncated() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "the zstd stream is truncated")
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Hashes and counts every byte read through it; remembers whether the inner reader (the
/// decompressor) failed, so a tar error can be told apart from a stream error.
pub(super) struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
    pub(super) inner_failed: bool,
}

impl<R> std::fmt::Debug for HashingReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HashingReader")
            .field("bytes", &self.bytes)
            .field("inner_failed", &self.inner_failed)
            .finish_non_exhaustive()
    }
}

impl<R: Read> HashingReader<R> {
    pub(super) fn new(inner: R) -> HashingReader<R> {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
            inner_failed: false,
        }
    }

    /// Reads the rest of the stream (the tar end-of-archive blocks and record padding), so that
    /// the digest covers all of it.
    pub(super) fn drain(&mut self) -> io::Result<()> {
        io::copy(self, &mut io::sink()).map(drop)
    }

    /// The stream's `sha256:<hex>` digest and length.
    pub(super) fn finish(self) -> (String, u64) {
        (
            format!("sha256:{}", hex::encode(self.hasher.finalize())),
            self.bytes,
        )
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = match self.inner.read(buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Err(e),
            Err(e) => {
                self.inner_failed = true;
                return Err(e);
            }
        };
        let data = buf.get(..n).unwrap_or_default();
        self.hasher.update(data);
        self.bytes += data.len() as u64;
        Ok(n)
    }
}
