# The model bucket and the network modules on their own.

mock_provider "aws" {
  source = "./tests/mocks"
}

run "model_bucket_is_private_encrypted_versioned_and_tls_only" {
  module {
    source = "./modules/model_bucket"
  }

  variables {
    name = "llm"
  }

  assert {
    condition = (
      aws_s3_bucket_public_access_block.this.block_public_acls && aws_s3_bucket_public_access_block.this.block_public_policy &&
      aws_s3_bucket_public_access_block.this.ignore_public_acls && aws_s3_bucket_public_access_block.this.restrict_public_buckets
    )
    error_message = "all four public access blocks must be on"
  }
  assert {
    condition     = one(one(aws_s3_bucket_server_side_encryption_configuration.this.rule).apply_server_side_encryption_by_default).sse_algorithm == "aws:kms"
    error_message = "objects must be encrypted with KMS by default"
  }
  assert {
    condition     = aws_s3_bucket_versioning.this.versioning_configuration[0].status == "Enabled"
    error_message = "the bucket must be versioned"
  }
  assert {
    condition     = one(aws_s3_bucket_ownership_controls.this.rule).object_ownership == "BucketOwnerEnforced"
    error_message = "ACLs must be disabled"
  }
  assert {
    condition = anytrue([
      for s in jsondecode(aws_s3_bucket_policy.this.policy).Statement :
      s.Effect == "Deny" && s.Condition.Bool["aws:SecureTransport"] == "false"
    ])
    error_message = "requests without TLS must be denied"
  }
}

run "network_is_public_subnets_without_automatic_public_ips" {
  module {
    source = "./modules/network"
  }

  variables {
    name               = "llm"
    availability_zones = ["us-east-1a", "us-east-1b"]
  }

  assert {
    condition     = aws_subnet.public[*].cidr_block == ["10.42.0.0/24", "10.42.1.0/24"] && aws_subnet.public[*].availability_zone == ["us-east-1a", "us-east-1b"]
    error_message = "one /24 per zone, in order"
  }
  assert {
    condition     = alltrue([for s in aws_subnet.public : !s.map_public_ip_on_launch])
    error_message = "public addresses come from Elastic IPs only"
  }
  assert {
    condition     = length(aws_default_security_group.this.ingress) == 0 && length(aws_default_security_group.this.egress) == 0
    error_message = "the VPC's default security group must allow nothing"
  }
  assert {
    condition     = length(aws_flow_log.this) == 0 && output.flow_log_group_name == null
    error_message = "flow logs are opt-in"
  }
}

run "flow_logs_when_enabled" {
  module {
    source = "./modules/network"
  }

  variables {
    name               = "llm"
    availability_zones = ["us-east-1a", "us-east-1b"]
    enable_flow_logs   = true
  }

  assert {
    condition     = aws_flow_log.this[0].traffic_type == "ALL" && aws_cloudwatch_log_group.flow_logs[0].retention_in_days == 365
    error_message = "flow logs must record all traffic into a log group kept a year"
  }
}
