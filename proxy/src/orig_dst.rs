//! The original destination of a redirected connection (`SO_ORIGINAL_DST`).
//!
//! This is the one module of the crate allowed `unsafe`: reading `SO_ORIGINAL_DST` needs a
//! raw `getsockopt` call that no dependency of ours wraps. The call writes at most the
//! `sockaddr_in`/`sockaddr_in6` we hand it, with its length, and nothing else.
#![allow(unsafe_code)]

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

/// `SO_ORIGINAL_DST` (linux/netfilter_ipv4.h) and `IP6T_SO_ORIGINAL_DST`
/// (linux/netfilter_ipv6/ip6_tables.h) share the value 80.
const SO_ORIGINAL_DST: libc::c_int = 80;

/// Where the client meant to connect before iptables redirected it to us. An error when the
/// connection was not redirected (no conntrack entry).
pub fn original_dst(stream: &impl AsRawFd, local: SocketAddr) -> std::io::Result<SocketAddr> {
    let fd = stream.as_raw_fd();
    if local.is_ipv4() {
        // SAFETY: `addr` is a properly sized, writable sockaddr_in and `len` holds its size;
        // the kernel writes no more than `len` bytes.
        let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IP,
                SO_ORIGINAL_DST,
                (&mut addr as *mut libc::sockaddr_in).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
        Ok(SocketAddr::V4(SocketAddrV4::new(
            ip,
            u16::from_be(addr.sin_port),
        )))
    } else {
        // SAFETY: as above, with sockaddr_in6.
        let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IPV6,
                SO_ORIGINAL_DST,
                (&mut addr as *mut libc::sockaddr_in6).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let ip = Ipv6Addr::from(addr.sin6_addr.s6_addr);
        Ok(SocketAddr::V6(SocketAddrV6::new(
            ip,
            u16::from_be(addr.sin6_port),
            0,
            0,
        )))
    }
}
