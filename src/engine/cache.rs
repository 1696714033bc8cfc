//! Precompiled artifacts on disk, so a restart loads a tool in milliseconds
//! instead of compiling it again.
//!
//! An artifact is keyed by the wasm's sha256 and by the engine's compatibility
//! hash (wasmtime version, target, and every setting that changes generated code:
//! fuel, epochs, pooling...). An artifact made by another configuration is never
//! loaded; it just misses.
//!
//! Trust: deserializing an artifact runs its machine code, so the cache
//! directory must be writable only by the sandbox itself. It lives under the
//! data directory, outside every user's `/data`, and files are written to a
//! temporary name and renamed, so a crash never leaves half an artifact under a
//! real key.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::path::{Path, PathBuf};

use wasmtime::component::Component;
use wasmtime::{Engine, Module};

/// Where the artifacts of one engine configuration live.
pub(crate) struct ArtifactCache {
    dir: PathBuf,
    engine_key: String,
    /// Map artifacts instead of reading them (see [`read_artifact`]).
    map: bool,
}

/// A compiled tool and whether it came from the cache.
pub(crate) struct Compiled<T> {
    pub code: T,
    pub from_cache: bool,
}

impl ArtifactCache {
    pub(crate) fn new(dir: PathBuf, engine: &Engine, map: bool) -> io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let mut hasher = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(Self { dir, engine_key: format!("{:016x}", hasher.finish()), map })
    }

    fn path(&self, sha256: &str, kind: &str) -> PathBuf {
        self.dir.join(format!("{sha256}-{}.{kind}.cwasm", self.engine_key))
    }

    /// The compiled code for `wasm` (whose sha256 is `sha256`), from the cache
    /// or compiled and then stored.
    pub(crate) fn get<T: Artifact>(
        &self,
        engine: &Engine,
        sha256: &str,
        wasm: &[u8],
    ) -> Result<Compiled<T>, CacheMiss> {
        let path = self.path(sha256, T::KIND);
        if self.map && path.is_file() {
            match T::deserialize_file(engine, &path) {
                Ok(code) => return Ok(Compiled { code, from_cache: true }),
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "unusable artifact, recompiling"),
            }
        } else if let Some(bytes) = read_artifact(&path) {
            match T::deserialize(engine, &bytes) {
                Ok(code) => return Ok(Compiled { code, from_cache: true }),
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "unusable artifact, recompiling"),
            }
        }
        let code = T::compile(engine, wasm).map_err(CacheMiss::Compile)?;
        let bytes = code.serialize().map_err(CacheMiss::Compile)?;
        // The cache saves compile time; a cache that cannot be written (a full
        // or read-only disk) costs that time at the next start, not the tool.
        if let Err(e) = write_atomically(&path, &bytes) {
            tracing::warn!(path = %path.display(), error = %e, "artifact not cached: it is compiled again at the next load");
        }
        Ok(Compiled { code, from_cache: false })
    }
}

impl ArtifactCache {
    /// The artifact for `sha256` if the cache has one; never compiles.
    pub(crate) fn cached<T: Artifact>(&self, engine: &Engine, sha256: &str) -> Option<Compiled<T>> {
        let path = self.path(sha256, T::KIND);
        let code = if self.map {
            T::deserialize_file(engine, &path).ok()?
        } else {
            T::deserialize(engine, &read_artifact(&path)?).ok()?
        };
        Some(Compiled { code, from_cache: true })
    }

    /// The sha256 recorded for the file `stamp` describes, if any (see
    /// [`FileStamp`]).
    pub(crate) fn known(&self, stamp: &FileStamp) -> Option<String> {
        let sha256 = std::fs::read_to_string(self.stamp_path(stamp)).ok()?;
        (sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit())).then_some(sha256)
    }

    /// Records that the file `stamp` describes hashes to `sha256`, unless it
    /// had changed too recently, when it was stamped, for its stamp to tell a
    /// later change apart.
    pub(crate) fn remember(&self, stamp: &FileStamp, sha256: &str) {
        if !stamp.settled {
            return;
        }
        let path = self.stamp_path(stamp);
        let written = std::fs::create_dir_all(path.parent().unwrap_or(&self.dir))
            .and_then(|()| write_atomically(&path, sha256.as_bytes()));
        if let Err(e) = written {
            tracing::debug!(path = %path.display(), error = %e, "file stamp not recorded: the file is hashed again next time");
        }
    }

    fn stamp_path(&self, stamp: &FileStamp) -> PathBuf {
        self.dir.join("by-file").join(&stamp.key)
    }
}

/// What identifies one version of a file without reading it: device, inode,
/// size, modification and status-change times (nanoseconds). On Linux's own
/// filesystems (ext4, XFS, btrfs, tmpfs) the status change time (`ctime`)
/// moves with every write, rename onto the name, or `utimensat`, and no one
/// but the clock sets it; so, as ccache's direct mode does, a stamp seen again
/// is the same bytes. A change within the filesystem's timestamp granularity
/// after the stamp was taken could keep it, so a file that had changed less
/// than [`FileStamp::SETTLE`] before it was stamped is never recorded. What no
/// stamp sees: a file kept open and written through a shared memory mapping,
/// whose times move only at the first write to each clean page (the same gap
/// as ccache's and make's), and filesystems whose times are set elsewhere
/// (vfat's ctime is its creation time; NFS's come from the server's clock).
pub(crate) struct FileStamp {
    key: String,
    /// Whether the file's last change was [`FileStamp::SETTLE`] or more
    /// before `now` as given to [`FileStamp::of`].
    settled: bool,
}

impl FileStamp {
    const SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

    /// The stamp of the file `meta` describes, read at `now` (taken before
    /// the file was opened).
    pub(crate) fn of(meta: &std::fs::Metadata, now: std::time::SystemTime) -> Self {
        use sha2::Digest;
        use std::os::unix::fs::MetadataExt;
        let fields = format!(
            "{} {} {} {}.{} {}.{}",
            meta.dev(),
            meta.ino(),
            meta.size(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ctime(),
            meta.ctime_nsec()
        );
        let at = |secs: i64, nanos: i64| {
            std::time::UNIX_EPOCH
                + std::time::Duration::new(u64::try_from(secs).unwrap_or(0), u32::try_from(nanos).unwrap_or(0))
        };
        let changed = at(meta.mtime(), meta.mtime_nsec()).max(at(meta.ctime(), meta.ctime_nsec()));
        let settled = now.duration_since(changed).is_ok_and(|age| age >= Self::SETTLE);
        Self { key: hex::encode(sha2::Sha256::digest(fields.as_bytes())), settled }
    }
}

/// What the cache stores: wasmtime's components and core modules.
pub(crate) trait Artifact: Sized {
    const KIND: &'static str;
    fn compile(engine: &Engine, wasm: &[u8]) -> wasmtime::Result<Self>;
    fn serialize(&self) -> wasmtime::Result<Vec<u8>>;
    /// Loads an artifact read by [`read_artifact`].
    fn deserialize(engine: &Engine, artifact: &[u8]) -> wasmtime::Result<Self>;
    /// Loads an artifact by mapping its file (one-shot processes only).
    fn deserialize_file(engine: &Engine, path: &Path) -> wasmtime::Result<Self>;
}

impl Artifact for Component {
    const KIND: &'static str = "component";
    fn compile(engine: &Engine, wasm: &[u8]) -> wasmtime::Result<Self> {
        Component::new(engine, wasm)
    }
    fn serialize(&self) -> wasmtime::Result<Vec<u8>> {
        Component::serialize(self)
    }
    fn deserialize(engine: &Engine, artifact: &[u8]) -> wasmtime::Result<Self> {
        // SAFETY: `artifact` was read from this cache, which holds only complete
        // artifacts it wrote itself for an engine with the same compatibility
        // hash (see `read_artifact`).
        #[allow(unsafe_code)]
        unsafe {
            Component::deserialize(engine, artifact)
        }
    }
    fn deserialize_file(engine: &Engine, path: &Path) -> wasmtime::Result<Self> {
        // SAFETY: as for `deserialize`, and the file is never written in place
        // (`write_atomically` renames new artifacts over old ones, which leaves
        // a mapped file intact); only one-shot processes map (`map` above).
        #[allow(unsafe_code)]
        unsafe {
            Component::deserialize_file(engine, path)
        }
    }
}

/// A WASI preview 1 core module made a component by wasmtime's preview 1
/// adapter (see [`super::preview1`]); cached as the component it becomes.
pub(crate) struct AdaptedModule(pub Component);

impl Artifact for AdaptedModule {
    /// Versioned: a change to how modules are prepared for the adapter
    /// (`preview1::prepare`) must change it, or old artifacts are used.
    const KIND: &'static str = "p1-component-1";
    fn compile(engine: &Engine, wasm: &[u8]) -> wasmtime::Result<Self> {
        Component::new(engine, super::preview1::adapt(wasm)?).map(Self)
    }
    fn serialize(&self) -> wasmtime::Result<Vec<u8>> {
        Component::serialize(&self.0)
    }
    fn deserialize(engine: &Engine, artifact: &[u8]) -> wasmtime::Result<Self> {
        <Component as Artifact>::deserialize(engine, artifact).map(Self)
    }
    fn deserialize_file(engine: &Engine, path: &Path) -> wasmtime::Result<Self> {
        <Component as Artifact>::deserialize_file(engine, path).map(Self)
    }
}

impl Artifact for Module {
    const KIND: &'static str = "module";
    fn compile(engine: &Engine, wasm: &[u8]) -> wasmtime::Result<Self> {
        Module::new(engine, wasm)
    }
    fn serialize(&self) -> wasmtime::Result<Vec<u8>> {
        Module::serialize(self)
    }
    fn deserialize(engine: &Engine, artifact: &[u8]) -> wasmtime::Result<Self> {
        // SAFETY: as for components above.
        #[allow(unsafe_code)]
        unsafe {
            Module::deserialize(engine, artifact)
        }
    }
    fn deserialize_file(engine: &Engine, path: &Path) -> wasmtime::Result<Self> {
        // SAFETY: as for components above.
        #[allow(unsafe_code)]
        unsafe {
            Module::deserialize_file(engine, path)
        }
    }
}

/// Why no artifact could be had: the wasm did not validate or compile (the tool's fault).
#[derive(Debug)]
pub(crate) enum CacheMiss {
    Compile(wasmtime::Error),
}

/// Reads an artifact whole. The server reads artifacts, it does not map them:
/// wasmtime's `deserialize_file` maps the file, and a mapped file truncated
/// underneath the process (a disk error, a stray writer) kills it with SIGBUS.
/// Reading costs copies (about 90 ms for the 49 MB Python interpreter's
/// artifact) and keeps a long-lived server alive; a damaged artifact then just
/// fails wasmtime's header checks and is recompiled. One-shot processes
/// (`imagentx-sandbox run`) map instead: they live for one call.
///
/// Only files this cache wrote (complete, renamed into place, in the sandbox's
/// own directory) are ever under these names, which is what makes the
/// `deserialize` calls above sound.
fn read_artifact(path: &Path) -> Option<Vec<u8>> {
    match std::fs::read(path) {
        Ok(bytes) => Some(bytes),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "artifact unreadable, recompiling");
            None
        }
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", uuid::Uuid::now_v7().simple()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}
