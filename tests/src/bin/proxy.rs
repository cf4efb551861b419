//! A minimal HTTP CONNECT proxy for the end-to-end tests: the only way out
//! of the agent's firewalled network namespace. Usage: popupd-test-proxy
//! LISTEN_ADDR. Prints "listening" once bound.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into());
    let l = TcpListener::bind(&addr).await?;
    println!("listening {}", l.local_addr()?);
    loop {
        let (c, _) = l.accept().await?;
        tokio::spawn(async move {
            if let Err(e) = serve(c).await {
                eprintln!("proxy: {e}");
            }
        });
    }
}

async fn serve(mut c: TcpStream) -> anyhow::Result<()> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        anyhow::ensure!(head.len() < 8192, "head too long");
        anyhow::ensure!(c.read(&mut b).await? == 1, "closed");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let mut parts = head.split_whitespace();
    let (Some("CONNECT"), Some(target)) = (parts.next(), parts.next()) else {
        c.write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
            .await?;
        return Ok(());
    };
    // Tests only ever tunnel to loopback.
    anyhow::ensure!(
        target.starts_with("127.") || target.starts_with("localhost:"),
        "refusing {target}"
    );
    let mut up = match TcpStream::connect(target).await {
        Ok(u) => u,
        Err(e) => {
            c.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await?;
            return Err(e.into());
        }
    };
    c.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    tokio::io::copy_bidirectional(&mut c, &mut up).await?;
    Ok(())
}
