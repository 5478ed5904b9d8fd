//! The SSRF guard: which URLs ratepool may send a request to on a tenant's
//! behalf (today, job webhooks). The URL is a tenant's input and the request
//! leaves from inside our network, so [`check_url`] refuses bad schemes,
//! credentials and private address literals when the job is submitted, and
//! [`check_addr`] judges every address a host resolves to at delivery.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use url::{Host, Url};

/// Why a webhook URL is refused. Messages name the host, never the path or
/// query, which may hold the receiver's token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookUrlError {
    #[error("webhook URL is not a valid absolute URL: {0}")]
    Parse(#[from] url::ParseError),
    #[error("webhook URL scheme {0:?} is not allowed; use http or https")]
    Scheme(String),
    #[error("webhook URL must not contain a user name or password")]
    Userinfo,
    #[error("webhook URL has no host")]
    NoHost,
    #[error("webhook host {0} is a localhost name; private targets are not allowed")]
    Localhost(String),
    #[error("webhook host {host} is {reason} address {addr}; private targets are not allowed")]
    Forbidden { host: String, addr: IpAddr, reason: &'static str },
}

/// Checks a webhook URL's shape when a job is submitted: http(s), no
/// credentials, a host, and no private address literal (unless
/// `allow_private`). Host names are only checked for `localhost`; what they
/// resolve to is checked again at every delivery, since DNS answers change.
pub fn check_url(raw: &str, allow_private: bool) -> Result<Url, WebhookUrlError> {
    let url = Url::parse(raw)?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(WebhookUrlError::Scheme(url.scheme().to_string()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(WebhookUrlError::Userinfo);
    }
    // The url crate has already normalised IPv4 spellings such as
    // `0x7f.1` or `2130706433` into 127.0.0.1, so literals cannot slip by.
    match url.host() {
        None => return Err(WebhookUrlError::NoHost),
        Some(_) if allow_private => {}
        Some(Host::Ipv4(v4)) => check_addr(&v4.to_string(), IpAddr::V4(v4))?,
        Some(Host::Ipv6(v6)) => check_addr(&v6.to_string(), IpAddr::V6(v6))?,
        Some(Host::Domain(name)) => {
            let name = name.trim_end_matches('.');
            if name.is_empty() {
                return Err(WebhookUrlError::NoHost);
            }
            // RFC 6761: these always mean this machine.
            if name == "localhost" || name.ends_with(".localhost") {
                return Err(WebhookUrlError::Localhost(name.to_string()));
            }
        }
    }
    Ok(url)
}

/// Refuses `addr` unless it is a public address; `host` names it in the error.
pub fn check_addr(host: &str, addr: IpAddr) -> Result<(), WebhookUrlError> {
    match forbidden_reason(addr) {
        Some(reason) => Err(WebhookUrlError::Forbidden { host: host.to_string(), addr, reason }),
        None => Ok(()),
    }
}

/// Why a delivery must not go to `addr`, or `None` if it is a public address.
fn forbidden_reason(addr: IpAddr) -> Option<&'static str> {
    match addr {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn forbidden_v4(a: Ipv4Addr) -> Option<&'static str> {
    let [o0, o1, ..] = a.octets();
    Some(if a.is_unspecified() || o0 == 0 {
        "an unspecified (0.0.0.0/8)"
    } else if a.is_loopback() {
        "a loopback"
    } else if a.is_private() {
        "a private (RFC 1918)"
    } else if a.is_link_local() {
        // Includes 169.254.169.254, the cloud metadata service.
        "a link-local (169.254.0.0/16, cloud metadata)"
    } else if o0 == 100 && (o1 & 0xc0) == 64 {
        "a carrier-grade NAT (100.64.0.0/10)"
    } else if a.is_broadcast() {
        "the broadcast"
    } else if a.is_multicast() {
        "a multicast"
    } else if o0 >= 240 {
        "a reserved (240.0.0.0/4)"
    } else {
        return None;
    })
}

fn forbidden_v6(a: Ipv6Addr) -> Option<&'static str> {
    let s = a.segments();
    if a.is_unspecified() {
        return Some("an unspecified (::)");
    }
    if a.is_loopback() {
        return Some("a loopback");
    }
    // IPv4-mapped (::ffff:a.b.c.d), IPv4-compatible (::a.b.c.d) and NAT64
    // (64:ff9b::a.b.c.d) addresses reach the embedded IPv4 address.
    let embedded = a.to_ipv4_mapped().or_else(|| {
        let compatible = s[..6] == [0; 6];
        let nat64 = s[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
        (compatible || nat64).then(|| Ipv4Addr::from(((s[6] as u32) << 16) | s[7] as u32))
    });
    if let Some(v4) = embedded {
        return forbidden_v4(v4);
    }
    Some(if (s[0] & 0xfe00) == 0xfc00 {
        "a unique-local (fc00::/7)"
    } else if (s[0] & 0xffc0) == 0xfe80 {
        "a link-local (fe80::/10)"
    } else if (s[0] & 0xffc0) == 0xfec0 {
        "a site-local (fec0::/10)"
    } else if a.is_multicast() {
        "a multicast"
    } else {
        return None;
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_policy_table() {
        let refused = [
            ("http://127.0.0.1/hook", "loopback"),
            ("http://127.8.9.10:8080/hook", "loopback"),
            ("http://0x7f.1/hook", "loopback"),
            ("http://2130706433/hook", "loopback"),
            ("http://10.1.2.3/hook", "private"),
            ("http://172.16.0.1/hook", "private"),
            ("http://172.31.255.255/hook", "private"),
            ("http://192.168.1.1/hook", "private"),
            ("http://169.254.169.254/latest/meta-data/", "link-local"),
            ("http://100.64.0.1/hook", "carrier-grade NAT"),
            ("http://100.127.255.255/hook", "carrier-grade NAT"),
            ("http://0.0.0.0/hook", "unspecified"),
            ("http://255.255.255.255/hook", "broadcast"),
            ("http://[::1]/hook", "loopback"),
            ("http://[::]/hook", "unspecified"),
            ("http://[fe80::1]/hook", "link-local"),
            ("http://[fc00::1]/hook", "unique-local"),
            ("http://[fd12:3456::1]/hook", "unique-local"),
            ("http://[::ffff:127.0.0.1]/hook", "loopback"),
            ("http://[::ffff:10.0.0.1]/hook", "private"),
            ("http://[::ffff:169.254.169.254]/hook", "link-local"),
            ("http://[64:ff9b::a9fe:a9fe]/hook", "link-local"),
            ("http://localhost/hook", "localhost"),
            ("http://api.localhost./hook", "localhost"),
            ("file:///etc/passwd", "scheme"),
            ("ftp://example.com/hook", "scheme"),
            ("gopher://example.com/", "scheme"),
            ("https://user:pass@example.com/hook", "user name or password"),
            ("https://token@example.com/hook", "user name or password"),
            ("not a url", "not a valid"),
            ("/relative/path", "not a valid"),
        ];
        for (raw, why) in refused {
            let err = check_url(raw, false).expect_err(raw).to_string();
            assert!(err.contains(why), "{raw}: {err:?} should say {why:?}");
            assert!(!err.contains("/hook"), "{raw}: the error must not quote the path: {err}");
        }
        for ok in [
            "https://93.184.215.14/hook",
            "http://8.8.8.8:8080/hook?token=x",
            "https://[2606:4700:4700::1111]/hook",
            "https://hooks.example.com/ratepool",
            "http://100.128.0.1/hook",
            "http://172.32.0.1/hook",
        ] {
            assert!(check_url(ok, false).is_ok(), "{ok} should be accepted");
        }
        // allow_private lets private targets through, but not bad schemes or credentials.
        for ok in ["http://127.0.0.1:9000/hook", "http://[::1]/hook", "http://localhost/hook", "http://10.0.0.1/"] {
            assert!(check_url(ok, true).is_ok(), "{ok} should be accepted with allow_private");
        }
        assert!(matches!(check_url("file:///etc/passwd", true), Err(WebhookUrlError::Scheme(_))));
        assert_eq!(check_url("http://u:p@127.0.0.1/", true), Err(WebhookUrlError::Userinfo));
    }
}
