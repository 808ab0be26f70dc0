//! PEM decoding and the file I/O for key material.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::Error;

/// Decodes every `CERTIFICATE` block in `pem`, in order. Other block types
/// (a private key in the same file, say) are skipped.
pub fn parse_certificates(
    pem: &str,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::ParsePem {
            what,
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(Error::ParsePem {
            what,
            reason: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

/// Encodes certificates as concatenated PEM blocks.
pub fn encode_certificates(certs: &[CertificateDer<'_>]) -> String {
    certs
        .iter()
        .map(|cert| encode_block("CERTIFICATE", cert.as_ref()))
        .collect()
}

/// Encodes one PEM block.
pub(crate) fn encode_block(label: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(label, der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// Reads a whole file as UTF-8 text.
pub fn read_to_string(path: &Path) -> Result<String, Error> {
    fs::read_to_string(path).map_err(|source| Error::ReadFile {
        path: path.to_owned(),
        source,
    })
}

/// Creates `path` with `contents` only if it does not exist yet, atomically:
/// readers never see a half-written file, and of two processes racing to
/// create it exactly one wins. Returns `false` if the file already existed.
/// The file is private to the owner because it may hold a key.
pub fn create_private_file_once(path: &Path, contents: &str) -> Result<bool, Error> {
    let write_err = |source| Error::WriteFile {
        path: path.to_owned(),
        source,
    };
    let tmp = temp_sibling(path);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(write_err)?;
    let written = file
        .write_all(contents.as_bytes())
        .and_then(|()| file.sync_all());
    drop(file);
    // A hard link fails if the target exists, which makes creation exclusive;
    // a rename would silently replace a CA another process just created.
    let linked = written.and_then(|()| fs::hard_link(&tmp, path));
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(write_err(e)),
    }
}

fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let unique: u64 = rand::random();
    path.with_file_name(format!(".{name}.{}.{unique:016x}.tmp", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_round_trip_through_pem() {
        let der = CertificateDer::from((0u8..200).collect::<Vec<u8>>());
        let pem = encode_certificates(&[der.clone(), der.clone()]);
        assert_eq!(
            parse_certificates(&pem, "test").unwrap(),
            vec![der.clone(), der]
        );
    }

    #[test]
    fn empty_or_garbage_pem_is_an_error() {
        assert!(parse_certificates("", "test").is_err());
        assert!(parse_certificates("hello", "test").is_err());
        let broken = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        let err = parse_certificates(broken, "root").unwrap_err().to_string();
        assert!(err.contains("decoding PEM root"), "{err}");
    }

    #[test]
    fn private_file_is_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        assert!(create_private_file_once(&path, "first").unwrap());
        assert!(!create_private_file_once(&path, "second").unwrap());
        assert_eq!(read_to_string(&path).unwrap(), "first");
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "temp file left behind"
        );
    }
}
