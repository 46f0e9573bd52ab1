# One key set for the deployment: the gateways' hashed keys file as one S3 object that every
# host reads (python -m app.keys --store writes it, with the operator's own credentials). A
# replaced or added host serves every key from its first request; a revocation reaches every
# host within seconds.
#
# Its own bucket rather than a prefix of the model bucket: that one is optional, a cache of
# public weights the hosts write to, encrypted with the AWS-managed key (which any principal
# of the account allowed to read S3 can use) and emptied on every destroy. The key set needs a
# key of its own, so that reading the hashes takes an explicit grant, readers that cannot
# write, and old versions kept long enough to restore one after a bad change.

data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

# S3's addresses in the region: the gateway unit filters IP addresses (IPAddressDeny=any), and
# is allowed these to reach S3
data "aws_ec2_managed_prefix_list" "s3" {
  name = "com.amazonaws.${var.region}.s3"
}

locals {
  object_arn = "${aws_s3_bucket.this.arn}/${var.object_key}"
  # an empty key set: the gateways start (and serve no key) before the first `create`
  empty_key_set = "${jsonencode({ version = 1, keys = [] })}\n"
}

resource "aws_kms_key" "this" {
  description             = "${var.name}: the gateways' hashed API keys (S3 object ${var.object_key})"
  enable_key_rotation     = true
  deletion_window_in_days = var.kms_deletion_window_days
  # The account's administrators manage and use the key through IAM, as with any key of the
  # account; the hosts get kms:Decrypt through their role's policy below, narrowed to S3
  # reading this one object.
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Sid       = "AccountAdministersThroughIam"
      Effect    = "Allow"
      Principal = { AWS = "arn:${data.aws_partition.current.partition}:iam::${data.aws_caller_identity.current.account_id}:root" }
      Action    = "kms:*"
      Resource  = "*"
    }]
  })
}

resource "aws_kms_alias" "this" {
  name          = "alias/${var.name}-keys"
  target_key_id = aws_kms_key.this.key_id
}

resource "aws_s3_bucket" "this" {
  #checkov:skip=CKV_AWS_18:server access logs need a second bucket; every change is a new object version, and CloudTrail data events can record reads when wanted
  #checkov:skip=CKV_AWS_144:cross-region replication of a few kilobytes of hashes: versions restore a bad change, and a lost region takes the hosts with it
  #checkov:skip=CKV2_AWS_62:no consumer for event notifications: the gateways poll the object with conditional reads

  bucket_prefix = "${var.name}-keys-"
  force_destroy = var.force_destroy
}

resource "aws_s3_bucket_public_access_block" "this" {
  bucket                  = aws_s3_bucket.this.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

# ACLs off: access is decided by IAM, the bucket policy and the KMS key alone
resource "aws_s3_bucket_ownership_controls" "this" {
  bucket = aws_s3_bucket.this.id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

# every write keeps the previous version: a bad change is undone by restoring one
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
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.this.arn
    }
    # No bucket key: each object is then encrypted under its own ARN as encryption context,
    # which the hosts' kms:Decrypt is narrowed to. The object is small and read in full only
    # when it changed (the gateways' conditional reads of an unchanged object return 304).
    bucket_key_enabled = false
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

# The first version, so that the gateways have something to start from. Terraform writes it
# once and never again: from then on `python -m app.keys --store` owns the content, and a
# plan must never put an empty set over the keys in force.
resource "aws_s3_object" "keys" {
  bucket                 = aws_s3_bucket.this.id
  key                    = var.object_key
  content                = local.empty_key_set
  content_type           = "application/json"
  server_side_encryption = "aws:kms"
  kms_key_id             = aws_kms_key.this.arn

  lifecycle {
    ignore_changes = all
  }

  depends_on = [aws_s3_bucket_server_side_encryption_configuration.this, aws_s3_bucket_policy.this]
}

# The hosts read that one object and decrypt it through S3; they cannot write, list or
# delete, and cannot use the key for anything else.
resource "aws_iam_role_policy" "read" {
  name = "read-key-set"
  role = var.host_role_name
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      { Sid = "ReadKeySet", Effect = "Allow", Action = "s3:GetObject", Resource = local.object_arn },
      {
        Sid      = "DecryptKeySetThroughS3"
        Effect   = "Allow"
        Action   = "kms:Decrypt"
        Resource = aws_kms_key.this.arn
        Condition = {
          StringEquals = {
            "kms:ViaService"                   = "s3.${var.region}.amazonaws.com"
            "kms:EncryptionContext:aws:s3:arn" = local.object_arn
          }
        }
      },
    ]
  })
}
