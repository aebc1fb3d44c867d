//! Manifest and index documents: media types, parsing, and the layer file names shown in `layers/`.
//!
//! Parsing is lenient about unknown fields (registries add their own) and strict about what regfs
//! needs: descriptors must have a digest and a size.

use serde::{Deserialize, Serialize};

use crate::error::{RegistryError, RegistryResult};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// Every manifest type regfs understands, sent as `Accept` on every manifest request.
/// distribution 2.8 matches Accept exactly, so leaving one out turns into a 404.
pub const MANIFEST_ACCEPT: &[&str] = &[OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST];

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// `os-arch[-variant]`, the directory name of a platform entry.
    pub fn dir_name(&self) -> String {
        let mut s = format!("{}-{}", self.os, self.architecture);
        if let Some(v) = self.variant.as_deref().filter(|v| !v.is_empty()) {
            s.push('-');
            s.push_str(v);
        }
        // Names come from the registry: nothing that could not be a file name (it always
        // holds a `-`, so it is never `.` or `..`).
        s.replace(['/', '\0'], "_")
    }
}

/// A parsed manifest: an image, or an index of other manifests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Image {
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
    Index {
        manifests: Vec<Descriptor>,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    #[serde(default)]
    schema_version: Option<u32>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

/// Parse a manifest body. `content_type` is what the registry sent (parameters ignored).
pub fn parse(content_type: &str, body: &[u8]) -> RegistryResult<Parsed> {
    let raw: RawManifest = serde_json::from_slice(body)
        .map_err(|e| RegistryError::Malformed(format!("manifest: {e}")))?;
    let ct = content_type.split(';').next().unwrap_or("").trim();
    let media = raw
        .media_type
        .clone()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| ct.to_string());
    if raw.schema_version == Some(1) {
        return Err(RegistryError::Unsupported(
            "Docker schema 1 manifest".to_string(),
        ));
    }
    let is_index = match media.as_str() {
        OCI_INDEX | DOCKER_LIST => true,
        OCI_MANIFEST | DOCKER_MANIFEST => false,
        // No usable media type: decide by shape, as the OCI spec allows.
        "" | "application/json" | "application/octet-stream" => {
            raw.manifests.is_some() && raw.config.is_none()
        }
        other => {
            return Err(RegistryError::Unsupported(format!(
                "manifest media type {other}"
            )))
        }
    };
    for d in raw
        .config
        .iter()
        .chain(raw.layers.iter().flatten())
        .chain(raw.manifests.iter().flatten())
    {
        if !crate::digest::is_valid_digest(&d.digest) {
            return Err(RegistryError::Malformed(format!(
                "descriptor digest {:?} is not a digest",
                d.digest.chars().take(80).collect::<String>()
            )));
        }
    }
    if is_index {
        let manifests = raw
            .manifests
            .ok_or_else(|| RegistryError::Malformed("index without manifests".into()))?;
        Ok(Parsed::Index { manifests })
    } else {
        let config = raw
            .config
            .ok_or_else(|| RegistryError::Malformed("image manifest without config".into()))?;
        Ok(Parsed::Image {
            config,
            layers: raw.layers.unwrap_or_default(),
        })
    }
}

/// The media type of a manifest body: its `mediaType`, else an OCI index or OCI manifest by shape
/// (a `manifests` list makes an index). This is the Content-Type a manifest is pushed with. An error
/// when the body is not a JSON document with those fields.
pub fn media_type_of(body: &[u8]) -> Result<String, serde_json::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Mt {
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    Ok(match serde_json::from_slice::<Mt>(body)? {
        Mt {
            media_type: Some(m),
            ..
        } if !m.is_empty() => m,
        Mt {
            manifests: Some(_), ..
        } => OCI_INDEX.to_string(),
        _ => OCI_MANIFEST.to_string(),
    })
}

/// [`media_type_of`] for a body a registry served without a usable Content-Type: a body that does
/// not parse is called an OCI manifest (and fails when it is parsed as one).
pub fn sniff_media_type(body: &[u8]) -> String {
    media_type_of(body).unwrap_or_else(|_| OCI_MANIFEST.to_string())
}

/// File extension of a layer, from its media type: tar, tar.gz, tar.zst, else blob.
pub fn layer_extension(media_type: &str) -> &'static str {
    let m = media_type;
    if m.ends_with("tar+gzip") || m.ends_with("tar.gzip") || m.ends_with(".tar.gzip") {
        "tar.gz"
    } else if m.ends_with("tar+zstd") {
        "tar.zst"
    } else if m.ends_with(".tar") || m.ends_with("layer.v1.tar") {
        "tar"
    } else {
        "blob"
    }
}

/// `NN-<hex12>.<ext>` for layer `index` of `count`.
pub fn layer_file_name(index: usize, count: usize, layer: &Descriptor) -> String {
    let hex12 = crate::digest::short_hex(&layer.digest);
    let width = if count > 100 { 3 } else { 2 };
    format!(
        "{index:0width$}-{hex12}.{}",
        layer_extension(&layer.media_type)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_image_and_index() {
        let img = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:aa","size":2},
            "layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:bb","size":3}],
            "extra":1}"#;
        match parse("", img).unwrap() {
            Parsed::Image { config, layers } => {
                assert_eq!(config.size, 2);
                assert_eq!(layers.len(), 1);
            }
            _ => panic!(),
        }
        let idx = br#"{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "digest":"sha256:cc","size":5,"platform":{"os":"linux","architecture":"arm64","variant":"v8"}}]}"#;
        match parse(OCI_INDEX, idx).unwrap() {
            Parsed::Index { manifests } => {
                assert_eq!(
                    manifests[0].platform.as_ref().unwrap().dir_name(),
                    "linux-arm64-v8"
                )
            }
            _ => panic!(),
        }
        assert_eq!(sniff_media_type(idx), OCI_INDEX);
        assert_eq!(media_type_of(idx).unwrap(), OCI_INDEX);
        assert_eq!(media_type_of(img).unwrap(), OCI_MANIFEST);
        assert_eq!(
            media_type_of(
                br#"{"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}"#
            )
            .unwrap(),
            DOCKER_MANIFEST
        );
        assert!(media_type_of(b"{nope").is_err());
        assert_eq!(sniff_media_type(b"{nope"), OCI_MANIFEST);
    }

    #[test]
    fn rejects_malformed_and_unknown() {
        assert!(matches!(
            parse(OCI_MANIFEST, b"{not json"),
            Err(RegistryError::Malformed(_))
        ));
        assert!(matches!(
            parse(OCI_MANIFEST, br#"{"schemaVersion":2,"layers":[]}"#),
            Err(RegistryError::Malformed(_))
        ));
        assert!(matches!(
            parse(
                "application/x-weird",
                br#"{"mediaType":"application/x-weird"}"#
            ),
            Err(RegistryError::Unsupported(_))
        ));
        assert!(matches!(
            parse("", br#"{"schemaVersion":1,"fsLayers":[]}"#),
            Err(RegistryError::Unsupported(_))
        ));
    }

    #[test]
    fn hostile_digests_and_platforms_are_refused_or_tamed() {
        for bad in [
            "sha256:ééééééééééééé",
            "sha256:../../etc",
            "",
            "nocolon",
            "sha256:",
        ] {
            let body = format!(
                r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"digest":"sha256:aa","size":2}},"layers":[{{"digest":{bad:?},"size":1}}]}}"#
            );
            assert!(
                matches!(parse("", body.as_bytes()), Err(RegistryError::Malformed(_))),
                "{bad}"
            );
        }
        // Names are made safely from any text.
        let d = Descriptor {
            media_type: String::new(),
            digest: "sha256:ééééééééééééé".into(),
            size: 1,
            platform: None,
            annotations: None,
        };
        assert_eq!(layer_file_name(0, 1, &d), "00-éééééééééééé.blob");
        let p = |os: &str, arch: &str| {
            Platform {
                os: os.into(),
                architecture: arch.into(),
                variant: None,
            }
            .dir_name()
        };
        assert_eq!(p("a/b", "x\0y"), "a_b-x_y");
    }

    #[test]
    fn layer_names() {
        let d = |mt: &str| Descriptor {
            media_type: mt.into(),
            digest: format!("sha256:{}", "ab".repeat(32)),
            size: 1,
            platform: None,
            annotations: None,
        };
        assert_eq!(
            layer_file_name(0, 2, &d(OCI_LAYER_GZIP)),
            "00-abababababab.tar.gz"
        );
        assert_eq!(
            layer_file_name(
                7,
                2,
                &d("application/vnd.docker.image.rootfs.diff.tar.gzip")
            ),
            "07-abababababab.tar.gz"
        );
        assert_eq!(
            layer_file_name(1, 2, &d(OCI_LAYER_ZSTD)),
            "01-abababababab.tar.zst"
        );
        assert_eq!(
            layer_file_name(1, 2, &d(OCI_LAYER_TAR)),
            "01-abababababab.tar"
        );
        assert_eq!(
            layer_file_name(5, 120, &d("application/x-foo")),
            "005-abababababab.blob"
        );
    }
}
