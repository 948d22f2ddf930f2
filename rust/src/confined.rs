//! Opening a file beneath a root folder, never following a link out of it.
//!
//! An adapter's files are untrusted input: a folder inside an operator's root may hold
//! links to anywhere, and may be swapped for one between two reads. Every read therefore
//! resolves its path afresh, beneath the root: Linux's `openat2` with `RESOLVE_BENEATH`
//! (every component, links included, must stay a descendant of the root; absolute links
//! and `..` above it are refused), or, where `openat2` is missing or filtered (kernels
//! before 5.6, some container seccomp profiles), an equivalent walk one component at a
//! time with `O_NOFOLLOW`, each link read and resolved by hand. The last component is
//! opened read-only without blocking, so a FIFO answers at once; the caller checks what it
//! got (`fstat`) on the handle it then reads.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};
use std::sync::OnceLock;

/// The most links one resolution follows (Linux's own bound).
const MAX_LINKS: usize = 40;

/// How a path is resolved beneath its root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolve {
    /// `openat2` where the kernel allows it, else the walk.
    Auto,
    /// The walk, always (tests compare the two).
    Walk,
}

/// `rel` opened read-only (non-blocking, close-on-exec, no controlling tty) beneath the
/// folder `root`. A path that leaves the root is `EXDEV`; too many links `ELOOP`.
pub fn open_beneath(root: &Path, rel: &Path, how: Resolve) -> io::Result<File> {
    if rel.is_absolute() {
        return Err(io::Error::from_raw_os_error(libc::EXDEV));
    }
    let root_fd = open_at(
        libc::AT_FDCWD,
        root.as_os_str(),
        libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
    )?;
    let flags = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY;
    let fd = if how == Resolve::Auto && openat2_works() {
        openat2(&root_fd, rel, flags)?
    } else {
        walk(root_fd, rel, flags)?
    };
    Ok(File::from(fd))
}

fn c_path(p: &OsStr) -> io::Result<CString> {
    CString::new(p.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn open_at(dir: libc::c_int, name: &OsStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    let c = c_path(name)?;
    // SAFETY: `c` is a NUL-terminated path; the result is checked before it is owned.
    let fd = unsafe { libc::openat(dir, c.as_ptr(), flags, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor this process owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn openat2(root: &OwnedFd, rel: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
    let c = c_path(rel.as_os_str())?;
    // SAFETY: open_how is plain data; zeroed is its documented default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: the kernel reads `how` (of the size given) and the NUL-terminated path.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor this process owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// Whether `openat2` with `RESOLVE_BENEATH` answers here (probed once: ENOSYS on old
/// kernels, EPERM or ENOSYS under some seccomp filters).
fn openat2_works() -> bool {
    static WORKS: OnceLock<bool> = OnceLock::new();
    *WORKS.get_or_init(|| {
        open_at(
            libc::AT_FDCWD,
            OsStr::new("/"),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
        .and_then(|root| openat2(&root, Path::new("."), libc::O_PATH | libc::O_CLOEXEC))
        .is_ok()
    })
}

/// The walk: each component opened `O_PATH | O_NOFOLLOW` from the folder before it (a
/// descriptor, so a folder swapped meanwhile changes nothing already walked); `..` goes
/// back one folder and never above the root; a link's target is read and walked in its
/// place (an absolute one is refused); the last component is opened with `O_NOFOLLOW`
/// from a folder known to lie beneath the root.
fn walk(root: OwnedFd, rel: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
    let mut folders = vec![root];
    let mut pending: Vec<Vec<u8>> = components(rel)?;
    pending.reverse(); // a stack: the next component last
    let mut links = 0;
    while let Some(name) = pending.pop() {
        let here = folders.last().expect("the root stays").as_raw_fd();
        match name.as_slice() {
            b"." => continue,
            b".." => {
                if folders.len() == 1 {
                    return Err(io::Error::from_raw_os_error(libc::EXDEV));
                }
                folders.pop();
                continue;
            }
            _ => {}
        }
        let os = OsStr::from_bytes(&name);
        let fd = open_at(here, os, libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)?;
        let st = fstat(&fd)?;
        if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            links += 1;
            if links > MAX_LINKS {
                return Err(io::Error::from_raw_os_error(libc::ELOOP));
            }
            let target = read_link(here, os)?;
            if target.first() == Some(&b'/') {
                return Err(io::Error::from_raw_os_error(libc::EXDEV));
            }
            let mut parts = components(Path::new(OsStr::from_bytes(&target)))?;
            parts.reverse();
            pending.extend(parts);
            continue;
        }
        if pending.is_empty() {
            return open_at(here, os, flags | libc::O_NOFOLLOW);
        }
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        folders.push(fd);
    }
    // the path named a folder (or the root itself): open that one
    let here = folders.last().expect("the root stays").as_raw_fd();
    open_at(here, OsStr::new("."), flags)
}

fn components(p: &Path) -> io::Result<Vec<Vec<u8>>> {
    p.components()
        .map(|c| match c {
            Component::Normal(s) => Ok(s.as_bytes().to_vec()),
            Component::CurDir => Ok(b".".to_vec()),
            Component::ParentDir => Ok(b"..".to_vec()),
            Component::RootDir | Component::Prefix(_) => {
                Err(io::Error::from_raw_os_error(libc::EXDEV))
            }
        })
        .collect()
}

fn fstat(fd: &OwnedFd) -> io::Result<libc::stat> {
    // SAFETY: stat is plain data, filled by the kernel.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a stat buffer of the right size.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn read_link(dir: libc::c_int, name: &OsStr) -> io::Result<Vec<u8>> {
    let c = c_path(name)?;
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: the buffer's length is passed; the kernel writes at most that.
    let n = unsafe { libc::readlinkat(dir, c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// Words for an error of `open_beneath`, naming what the kernel's code means here.
pub fn describe(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EXDEV) => {
            "it leads outside the adapter's root (links out are not followed)".into()
        }
        Some(libc::ELOOP) => "too many links to resolve".into(),
        Some(libc::ENOENT) => "it does not exist".into(),
        Some(libc::ENOTDIR) => "a component of its path is not a folder".into(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::symlink;

    fn read(root: &Path, rel: &str, how: Resolve) -> io::Result<String> {
        let mut s = String::new();
        open_beneath(root, Path::new(rel), how)?.read_to_string(&mut s)?;
        Ok(s)
    }

    #[test]
    fn both_ways_read_inside_and_refuse_outside() {
        let tmp = std::env::temp_dir().join(format!("loraplex-confined-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let (root, out) = (tmp.join("root"), tmp.join("out"));
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(root.join("a/b/f"), "in").unwrap();
        std::fs::write(out.join("secret"), "out").unwrap();
        symlink("b/f", root.join("a/near")).unwrap(); // inside: followed
        symlink("../../out/secret", root.join("a/far")).unwrap(); // out: refused
        symlink(out.join("secret"), root.join("abs")).unwrap(); // absolute: refused
        symlink("../root/a/b/f", root.join("back")).unwrap(); // leaves, comes back: refused
        symlink("loop", root.join("loop")).unwrap();
        for how in [Resolve::Auto, Resolve::Walk] {
            assert_eq!(read(&root, "a/b/f", how).unwrap(), "in");
            assert_eq!(read(&root, "a/near", how).unwrap(), "in");
            assert_eq!(read(&root, "a/b/../b/f", how).unwrap(), "in");
            for bad in ["a/far", "abs", "back", "../out/secret", "/etc/passwd"] {
                let e = read(&root, bad, how).unwrap_err();
                assert_eq!(e.raw_os_error(), Some(libc::EXDEV), "{bad} {how:?}");
            }
            assert_eq!(
                read(&root, "loop", how).unwrap_err().raw_os_error(),
                Some(libc::ELOOP)
            );
            assert_eq!(
                read(&root, "missing", how).unwrap_err().raw_os_error(),
                Some(libc::ENOENT)
            );
        }
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
