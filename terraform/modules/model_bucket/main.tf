resource "aws_s3_bucket" "this" {
  #checkov:skip=CKV_AWS_18:server access logs need a second bucket; the objects are copies of hub model weights, and CloudTrail data events can record reads when wanted
  #checkov:skip=CKV_AWS_144:cross-region replication doubles storage for a cache that is rebuilt from the hub
  #checkov:skip=CKV2_AWS_62:no consumer for event notifications: hosts read the cache on demand

  bucket_prefix = "${var.name}-models-"
  force_destroy = var.force_destroy
}

resource "aws_s3_bucket_public_access_block" "this" {
  bucket                  = aws_s3_bucket.this.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

# ACLs off: access is decided by IAM and the bucket policy alone
resource "aws_s3_bucket_ownership_controls" "this" {
  bucket = aws_s3_bucket.this.id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_versioning" "this" {
  bucket = aws_s3_bucket.this.id

  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "this" {
  bucket = aws_s3_bucket.this.id

  rule {
    apply_server_side_encryption_by_default {
      # the AWS-managed key: readers in the account need no key policy of ours
      sse_algorithm = "aws:kms"
    }
    bucket_key_enabled = true # one KMS call per object instead of per request: multi-GB reads stay cheap
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "this" {
  bucket = aws_s3_bucket.this.id

  rule {
    id     = "expire-old-versions"
    status = "Enabled"

    filter {}

    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_expiration_days
    }

    # interrupted multi-GB uploads otherwise linger and cost money
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }

  depends_on = [aws_s3_bucket_versioning.this]
}

resource "aws_s3_bucket_policy" "this" {
  bucket = aws_s3_bucket.this.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Sid       = "DenyPlainHttp"
      Effect    = "Deny"
      Principal = "*"
      Action    = "s3:*"
      Resource  = [aws_s3_bucket.this.arn, "${aws_s3_bucket.this.arn}/*"]
      Condition = { Bool = { "aws:SecureTransport" = "false" } }
    }]
  })

  # a policy put before the public access block could be judged public and refused
  depends_on = [aws_s3_bucket_public_access_block.this]
}
