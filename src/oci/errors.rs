//! OCI error codes: one table giving each code's HTTP status, and the one mapper from the
//! internal error kind. Internal details are logged; clients get a sanitized message.

use http::StatusCode;

use crate::error::{Error, ErrorKind, What};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    Unsupported,
    Denied,
    Unauthorized,
    Unavailable,
    Unknown,
}

impl Code {
    /// (wire code, HTTP status)
    pub fn wire(self) -> (&'static str, StatusCode) {
        match self {
            Code::BlobUnknown => ("BLOB_UNKNOWN", StatusCode::NOT_FOUND),
            Code::BlobUploadInvalid => ("BLOB_UPLOAD_INVALID", StatusCode::BAD_REQUEST),
            Code::BlobUploadUnknown => ("BLOB_UPLOAD_UNKNOWN", StatusCode::NOT_FOUND),
            Code::DigestInvalid => ("DIGEST_INVALID", StatusCode::BAD_REQUEST),
            Code::ManifestBlobUnknown => ("MANIFEST_BLOB_UNKNOWN", StatusCode::BAD_REQUEST),
            Code::ManifestInvalid => ("MANIFEST_INVALID", StatusCode::BAD_REQUEST),
            Code::ManifestUnknown => ("MANIFEST_UNKNOWN", StatusCode::NOT_FOUND),
            Code::NameInvalid => ("NAME_INVALID", StatusCode::BAD_REQUEST),
            Code::NameUnknown => ("NAME_UNKNOWN", StatusCode::NOT_FOUND),
            Code::SizeInvalid => ("SIZE_INVALID", StatusCode::BAD_REQUEST),
            Code::Unsupported => ("UNSUPPORTED", StatusCode::METHOD_NOT_ALLOWED),
            Code::Denied => ("DENIED", StatusCode::FORBIDDEN),
            Code::Unauthorized => ("UNAUTHORIZED", StatusCode::UNAUTHORIZED),
            Code::Unavailable => ("UNAVAILABLE", StatusCode::SERVICE_UNAVAILABLE),
            Code::Unknown => ("UNKNOWN", StatusCode::INTERNAL_SERVER_ERROR),
        }
    }
}

#[derive(Debug)]
pub struct OciError {
    pub code: Code,
    pub status: StatusCode,
    pub message: String,
}

impl OciError {
    pub fn new(code: Code, message: impl Into<String>) -> OciError {
        OciError {
            code,
            status: code.wire().1,
            message: message.into(),
        }
    }

    pub fn with_status(mut self, status: StatusCode) -> OciError {
        self.status = status;
        self
    }

    /// Maps an internal error; `missing` is the code a miss means at this endpoint.
    pub fn from_error(e: Error, missing: Code) -> OciError {
        let code = match e.kind {
            ErrorKind::NotFound => missing,
            ErrorKind::InvalidArgument(What::Digest) => Code::DigestInvalid,
            ErrorKind::InvalidArgument(What::Name) => Code::NameInvalid,
            ErrorKind::InvalidArgument(What::Manifest | What::Reference) => Code::ManifestInvalid,
            ErrorKind::InvalidArgument(What::Range | What::Parameter) => Code::BlobUploadInvalid,
            ErrorKind::DigestMismatch => Code::DigestInvalid,
            ErrorKind::SizeMismatch => Code::SizeInvalid,
            ErrorKind::Conflict => Code::BlobUploadInvalid,
            // 405 is what the OCI spec (and its conformance suite) allows a registry to answer a
            // delete it does not perform; the message says what still holds the target.
            ErrorKind::InUse => Code::Unsupported,
            ErrorKind::Exhausted => {
                // A full store is the operator's limit, not the client's mistake: 507 says so.
                return OciError::new(Code::Denied, e.message)
                    .with_status(StatusCode::INSUFFICIENT_STORAGE);
            }
            ErrorKind::Unavailable => Code::Unavailable,
            ErrorKind::Internal => {
                tracing::error!(error = %e.message, "internal error");
                return OciError::new(Code::Unknown, "internal error; see the hoard log");
            }
        };
        OciError::new(code, e.message)
    }

    pub fn body(&self) -> String {
        serde_json::json!({
            "errors": [{
                "code": self.code.wire().0,
                "message": self.message,
                "detail": serde_json::Value::Null,
            }]
        })
        .to_string()
    }
}
