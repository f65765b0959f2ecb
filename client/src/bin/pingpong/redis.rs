//! The Redis side of `pingpong run --protocol redis-xadd`: the XADD request in RESP and a
//! parser for the replies, sans I/O.

/// `XADD bench-stream MAXLEN ~ 100000 * m <message>` in RESP, as `redis-benchmark` sends it
/// in `scripts/bench-latency.sh` (the stream trimmed so a long run stays small).
pub fn xadd_request(message: &[u8]) -> Vec<u8> {
    let args: [&[u8]; 8] = [
        b"XADD",
        b"bench-stream",
        b"MAXLEN",
        b"~",
        b"100000",
        b"*",
        b"m",
        message,
    ];
    let mut request = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        request.extend_from_slice(arg);
        request.extend_from_slice(b"\r\n");
    }
    request
}

/// One whole RESP reply at the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    /// Its length in bytes, terminators included.
    pub len: usize,
    /// The server's message, for an error reply.
    pub error: Option<String>,
}

/// The longest reply line taken (an XADD's reply is an ID of a few dozen bytes).
const LINE_BYTES_MAX: usize = 512;

/// The first reply in `bytes`: `Ok(None)` while it is incomplete, `Err` for what an XADD's
/// reply cannot be (an array, an unknown type, a line without its end).
pub fn reply(bytes: &[u8]) -> Result<Option<Reply>, &'static str> {
    let Some(line_end) = bytes.windows(2).position(|pair| pair == b"\r\n") else {
        return if bytes.len() > LINE_BYTES_MAX {
            Err("a reply line longer than 512 bytes")
        } else {
            Ok(None)
        };
    };
    if line_end > LINE_BYTES_MAX {
        return Err("a reply line longer than 512 bytes");
    }
    let (kind, rest) = bytes[..line_end]
        .split_first()
        .ok_or("an empty reply line")?;
    let line_len = line_end + 2;
    match kind {
        b'+' | b':' => Ok(Some(Reply {
            len: line_len,
            error: None,
        })),
        b'-' => Ok(Some(Reply {
            len: line_len,
            error: Some(String::from_utf8_lossy(rest).into_owned()),
        })),
        b'$' => {
            let value_len: i64 = std::str::from_utf8(rest)
                .ok()
                .and_then(|text| text.parse().ok())
                .ok_or("a bulk string length that is not a number")?;
            if value_len == -1 {
                return Ok(Some(Reply {
                    len: line_len,
                    error: None,
                }));
            }
            let value_len = usize::try_from(value_len)
                .ok()
                .filter(|&len| len <= LINE_BYTES_MAX)
                .ok_or("a bulk string length out of range")?;
            let len = line_len + value_len + 2;
            if bytes.len() < len {
                return Ok(None);
            }
            if &bytes[len - 2..len] != b"\r\n" {
                return Err("a bulk string without its CRLF");
            }
            Ok(Some(Reply { len, error: None }))
        }
        _ => Err("a reply of a type XADD does not send"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_xadd_request_is_an_array_of_bulk_strings() {
        assert_eq!(
            xadd_request(b"ab"),
            b"*8\r\n$4\r\nXADD\r\n$12\r\nbench-stream\r\n$6\r\nMAXLEN\r\n$1\r\n~\r\n\
              $6\r\n100000\r\n$1\r\n*\r\n$1\r\nm\r\n$2\r\nab\r\n"
        );
    }

    #[test]
    fn a_reply_is_whole_only_with_its_last_byte() {
        let id = b"$15\r\n1700000000000-0\r\n";
        for cut in 0..id.len() {
            assert_eq!(reply(&id[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(
            reply(id),
            Ok(Some(Reply {
                len: id.len(),
                error: None
            }))
        );
        assert_eq!(
            reply(b"+OK\r\n$-1\r\n"),
            Ok(Some(Reply {
                len: 5,
                error: None
            }))
        );
        assert_eq!(
            reply(b"$-1\r\n"),
            Ok(Some(Reply {
                len: 5,
                error: None
            }))
        );
    }

    #[test]
    fn an_error_reply_carries_the_servers_message() {
        assert_eq!(
            reply(b"-ERR wrong number of arguments\r\n"),
            Ok(Some(Reply {
                len: 32,
                error: Some("ERR wrong number of arguments".into())
            }))
        );
    }

    #[test]
    fn what_xadd_does_not_send_is_refused() {
        assert!(reply(b"*1\r\n").is_err());
        assert!(reply(b"\r\n").is_err());
        assert!(reply(b"$x\r\n").is_err());
        assert!(reply(b"$-2\r\n").is_err());
        assert!(reply(b"$100000\r\n").is_err());
        assert!(reply(b"$2\r\nabcd").is_err());
        assert!(reply(&[b'+'; 600]).is_err());
    }
}
