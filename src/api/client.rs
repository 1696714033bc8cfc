//! Where a request comes from: the connection's peer address or, when the
//! peer is a reverse proxy listed in `[server] trusted_proxies`, the client
//! address it forwarded in `X-Forwarded-For`. Behaviour analysis keys failed
//! authentications by it and judges a user's spikes by its network; nothing
//! else (no limit, no permission) depends on it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::http::request::Parts;
use ipnet::IpNet;

const FORWARDED_FOR: &str = "x-forwarded-for";

/// How often the warning about a header from an unlisted peer is logged.
const WARN_EVERY: Duration = Duration::from_secs(3600);

/// The proxies whose `X-Forwarded-For` is believed.
#[derive(Debug, Default)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
    /// When the warning about an unlisted peer was last logged.
    warned: Mutex<Option<Instant>>,
}

impl TrustedProxies {
    /// Parses `[server] trusted_proxies`: addresses (`10.0.0.7`, `::1`) and
    /// networks (`10.0.0.0/24`, `fd00::/64`).
    ///
    /// # Errors
    ///
    /// The first entry that is neither, or an IPv4 one written as IPv6
    /// (`::ffff:10.0.0.7`: addresses are compared as IPv4), named.
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        let nets = entries
            .iter()
            .map(|entry| {
                let entry = entry.trim();
                let net =
                    entry.parse::<IpNet>().or_else(|_| entry.parse::<IpAddr>().map(IpNet::from)).map_err(|_| {
                        format!("trusted_proxies: `{entry}` is neither an IP address nor a network such as 10.0.0.0/24")
                    })?;
                if let IpNet::V6(v6) = net
                    && v6.network().to_ipv4_mapped().is_some()
                {
                    return Err(format!("trusted_proxies: write `{entry}` as an IPv4 address or network"));
                }
                Ok(net.trunc())
            })
            .collect::<Result<_, String>>()?;
        Ok(Self { nets, warned: Mutex::new(None) })
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.nets.iter().any(|net| net.contains(&ip))
    }

    /// The client's address: the peer's, or, when the peer is a trusted
    /// proxy, the nearest address in `X-Forwarded-For` (read from the
    /// right, past the trusted proxies) that is not a trusted proxy.
    /// `None` when the chain cannot be read (a malformed entry before an
    /// untrusted one), or when there is no peer address at all.
    pub fn client(&self, parts: &Parts) -> Option<IpAddr> {
        let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
        self.client_of(peer, &parts.headers)
    }

    /// [`TrustedProxies::client`], from the peer's address and the headers.
    pub fn client_of(&self, peer: Option<IpAddr>, headers: &axum::http::HeaderMap) -> Option<IpAddr> {
        let peer = peer?;
        let forwarded = || headers.get_all(FORWARDED_FOR).iter();
        if !self.trusts(peer) {
            if forwarded().next().is_some() && self.time_to_warn() {
                tracing::warn!(
                    peer = %peer,
                    "a request carries X-Forwarded-For from a peer that [server] trusted_proxies does not list: \
                     the header is ignored and the peer counts as the client; if it is your reverse proxy, list it, \
                     or behaviour analysis sees one client for everyone behind it"
                );
            }
            return Some(canonical(peer));
        }
        // Several headers are one list, in order. Each hop is read only if
        // the walk reaches it: what a client wrote on the left, however
        // malformed, cannot hide the address the proxy added.
        let mut hops: Vec<&[u8]> = Vec::new();
        for value in forwarded() {
            hops.extend(value.as_bytes().split(|b| *b == b','));
        }
        let mut client = canonical(peer);
        for hop in hops.iter().rev() {
            let hop = std::str::from_utf8(hop).ok()?;
            client = canonical(parse_hop(hop.trim())?);
            if !self.trusts(client) {
                break;
            }
        }
        Some(client)
    }

    /// Whether the warning about an unlisted peer is due (once an hour).
    fn time_to_warn(&self) -> bool {
        let mut warned = self.warned.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        if warned.is_some_and(|at| now.duration_since(at) < WARN_EVERY) {
            return false;
        }
        *warned = Some(now);
        true
    }
}

/// An `X-Forwarded-For` entry: an address, with a port or brackets as some
/// proxies write them (`203.0.113.7:4711`, `[2001:db8::1]:4711`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(addr) = hop.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    hop.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

/// An IPv4 address written as IPv6 (`::ffff:10.0.0.7`) as the IPv4 one.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Where failed keys come from, for behaviour analysis: an IPv4 address, or
/// an IPv6 /64 (one host can hold a whole /64, and rotate through it).
pub fn source_of(ip: IpAddr) -> String {
    match canonical(ip) {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

/// The network a client's calls are judged by: its IPv4 /24 or IPv6 /48
/// (what one site, one office or one cloud subnet holds).
pub fn network_of(ip: IpAddr) -> String {
    let net = match canonical(ip) {
        IpAddr::V4(v4) => IpNet::V4(ipnet::Ipv4Net::new_assert(v4, 24)),
        IpAddr::V6(v6) => IpNet::V6(ipnet::Ipv6Net::new_assert(v6, 48)),
    };
    net.trunc().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request;

    fn parts(peer: &str, forwarded: &[&str]) -> Parts {
        let mut request = Request::builder();
        for value in forwarded {
            request = request.header(FORWARDED_FOR, *value);
        }
        let (mut parts, ()) = request.body(()).expect("a request").into_parts();
        let peer: SocketAddr = peer.parse().expect("a peer address");
        parts.extensions.insert(ConnectInfo(peer));
        parts
    }

    fn client(proxies: &[&str], peer: &str, forwarded: &[&str]) -> Option<String> {
        let proxies =
            TrustedProxies::parse(&proxies.iter().map(|p| (*p).to_owned()).collect::<Vec<_>>()).expect("valid proxies");
        proxies.client(&parts(peer, forwarded)).map(|ip| ip.to_string())
    }

    #[test]
    fn the_header_is_believed_only_from_a_listed_proxy_and_read_from_the_right() {
        let direct = "203.0.113.9:5000";
        // No proxy listed: a client cannot name itself someone else.
        assert_eq!(client(&[], direct, &["198.51.100.1"]).as_deref(), Some("203.0.113.9"));
        assert_eq!(client(&["10.0.0.0/8"], direct, &["198.51.100.1"]).as_deref(), Some("203.0.113.9"));
        // From the proxy: the nearest untrusted hop, past a second proxy;
        // what the client wrote on the left is not believed.
        let proxy = "10.0.0.7:41000";
        let chain = ["1.2.3.4, 198.51.100.1", "10.0.0.8"];
        assert_eq!(client(&["10.0.0.0/8"], proxy, &chain).as_deref(), Some("198.51.100.1"));
        // Ports and brackets, and IPv4 written as IPv6.
        assert_eq!(client(&["10.0.0.7"], proxy, &["198.51.100.1:4711"]).as_deref(), Some("198.51.100.1"));
        assert_eq!(client(&["10.0.0.7"], proxy, &["[2001:db8::1]:4711"]).as_deref(), Some("2001:db8::1"));
        assert_eq!(client(&["10.0.0.7"], "[::ffff:10.0.0.7]:1", &["192.0.2.1"]).as_deref(), Some("192.0.2.1"));
        // The proxy's own request (a health check), and a chain of proxies only.
        assert_eq!(client(&["10.0.0.7"], proxy, &[]).as_deref(), Some("10.0.0.7"));
        assert_eq!(client(&["10.0.0.0/8"], proxy, &["10.1.1.1"]).as_deref(), Some("10.1.1.1"));
        // A hop that cannot be read before an untrusted one: unknown.
        assert_eq!(client(&["10.0.0.7"], proxy, &["198.51.100.1, unknown"]), None);
        assert_eq!(client(&["10.0.0.7"], proxy, &["unknown, 198.51.100.1"]).as_deref(), Some("198.51.100.1"));
        // Bytes that are not text, written by the client on the left (the
        // proxy appends its peer to what it got), hide nothing.
        let value = axum::http::HeaderValue::from_bytes(b"\xc3\xa9\xff, 198.51.100.1").expect("a header value");
        let mut request = parts(proxy, &[]);
        request.headers.insert(FORWARDED_FOR, value);
        let proxies = TrustedProxies::parse(&["10.0.0.7".into()]).expect("valid proxies");
        assert_eq!(proxies.client(&request).map(|ip| ip.to_string()).as_deref(), Some("198.51.100.1"));
    }

    #[test]
    fn entries_are_addresses_or_networks_and_a_bad_one_is_named() {
        assert!(TrustedProxies::parse(&["127.0.0.1".into(), "::1".into(), "10.1.2.3/8".into()]).is_ok());
        let err = TrustedProxies::parse(&["10.0.0.0/8".into(), "proxy.local".into()]).expect_err("a name");
        assert!(err.contains("`proxy.local`"), "{err}");
        assert!(TrustedProxies::parse(&["10.0.0.0/33".into()]).is_err());
        let err = TrustedProxies::parse(&["::ffff:10.0.0.0/104".into()]).expect_err("IPv4 written as IPv6");
        assert!(err.contains("as an IPv4"), "{err}");
    }

    #[test]
    fn networks_and_sources() {
        assert_eq!(network_of("198.51.100.77".parse().unwrap()), "198.51.100.0/24");
        assert_eq!(network_of("2001:db8:aa:bb::1".parse().unwrap()), "2001:db8:aa::/48");
        assert_eq!(network_of("::ffff:192.0.2.9".parse().unwrap()), "192.0.2.0/24");
        assert_eq!(source_of("2001:db8:aa:bb:cc::1".parse().unwrap()), "2001:db8:aa:bb::/64");
        assert_eq!(source_of("::ffff:192.0.2.9".parse().unwrap()), "192.0.2.9");
    }
}
