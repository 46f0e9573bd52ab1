# The store the gateways share their per-key budgets in once more than one host serves a key
# (app/limits.py, RedisLimiter): ElastiCache for Valkey in the private subnets, TLS and an AUTH
# token required, reachable from the GPU hosts' security group only. The token lives in an SSM
# SecureString that the hosts' role alone may read; no output of this module carries it.

locals {
  # one node cannot fail over: Multi-AZ and automatic failover need a replica to promote
  replicated = var.node_count > 1
}

data "aws_partition" "current" {}

data "aws_caller_identity" "current" {}

# ---- the AUTH token --------------------------------------------------------------------------

# The cache keeps the token it was created with (see the replication group); the parameter
# mirrors it from there, so both are attributes the provider marks sensitive and no plan or
# `terraform show` prints it.
resource "aws_ssm_parameter" "auth_token" {
  #checkov:skip=CKV_AWS_337:encrypted with the AWS-managed aws/ssm key; the hosts' role may decrypt through SSM for this one parameter only (kms:ViaService and the PARAMETER_ARN encryption context), which a customer key's policy would only repeat

  name        = "/${var.name}/gateway/redis-auth-token"
  description = "AUTH token of the ${var.name} rate-limit cache (ElastiCache for Valkey); the GPU hosts' role reads it"
  type        = "SecureString"
  value       = aws_elasticache_replication_group.this.auth_token
}

# ---- network ---------------------------------------------------------------------------------

resource "aws_elasticache_subnet_group" "this" {
  name        = "${var.name}-cache"
  description = "Private subnets of the ${var.name} rate-limit cache"
  subnet_ids  = var.subnet_ids
}

# No egress rule: the cache answers on established connections only, and Terraform removes the
# allow-all egress rule AWS adds to a new group.
resource "aws_security_group" "this" {
  name_prefix = "${var.name}-cache-"
  description = "Rate-limit cache: the cache port from the GPU hosts only"
  vpc_id      = var.vpc_id

  tags = { Name = "${var.name}-cache" }

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "from_hosts" {
  security_group_id            = aws_security_group.this.id
  description                  = "Valkey (TLS) from the GPU hosts' gateways"
  ip_protocol                  = "tcp"
  from_port                    = var.port
  to_port                      = var.port
  referenced_security_group_id = var.host_security_group_id
}

# The hosts' group sends to the web (80/443) only; the cache port is opened to this group alone.
resource "aws_vpc_security_group_egress_rule" "hosts_to_cache" {
  security_group_id            = var.host_security_group_id
  description                  = "Valkey (TLS) to the rate-limit cache"
  ip_protocol                  = "tcp"
  from_port                    = var.port
  to_port                      = var.port
  referenced_security_group_id = aws_security_group.this.id
}

# ---- the cache -------------------------------------------------------------------------------

resource "aws_elasticache_replication_group" "this" {
  #checkov:skip=CKV_AWS_191:encrypted at rest with ElastiCache's AWS-owned key; it holds only rate-limit counters that expire within the limit window, and a customer key would add cost and a key policy to run

  replication_group_id = "${var.name}-limits"
  description          = "Per-key rate-limit budgets shared by the ${var.name} gateways"
  engine               = "valkey"
  engine_version       = var.engine_version
  node_type            = var.node_type
  num_cache_clusters   = var.node_count
  port                 = var.port

  subnet_group_name  = aws_elasticache_subnet_group.this.name
  security_group_ids = [aws_security_group.this.id]

  at_rest_encryption_enabled = true
  transit_encryption_enabled = true
  # clients without TLS are refused, not merely allowed to upgrade
  transit_encryption_mode = "required"

  # Terraform's own uuid() (a version 4 UUID from Go's crypto/rand: 122 random bits) instead
  # of hashicorp/random, so the configuration keeps needing one provider only: two of them
  # without their dashes are 64 hex characters, 244 random bits, within ElastiCache's rule
  # (16 to 128 printable characters, no @, " or /). uuid() is new on every plan, so the value
  # the cache was created with is kept (ignore_changes below). A new token comes with a new
  # cache: `terraform apply -replace=module.cache[0].aws_elasticache_replication_group.this`
  # (the parameter follows; until the new cache answers, the gateways apply their
  # on_redis_error policy, and the counters start empty).
  auth_token = replace("${uuid()}${uuid()}", "-", "")

  automatic_failover_enabled = local.replicated
  multi_az_enabled           = local.replicated

  snapshot_retention_limit   = 0
  auto_minor_version_upgrade = true

  lifecycle {
    ignore_changes = [auth_token]
  }
}

# ---- who may read the token ------------------------------------------------------------------

# The hosts read the one parameter, and decrypt it only through SSM in this region and only
# for that parameter (SSM passes its ARN as the PARAMETER_ARN encryption context). The
# AWS-managed aws/ssm key's own policy already lets SSM users of the account decrypt; the
# statement is here so that the role states exactly what it needs.
resource "aws_iam_role_policy" "read_auth_token" {
  name = "read-cache-auth-token"
  role = var.host_role_name
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid      = "ReadTheCacheToken"
        Effect   = "Allow"
        Action   = "ssm:GetParameter"
        Resource = aws_ssm_parameter.auth_token.arn
      },
      {
        Sid      = "DecryptItThroughSsmOnly"
        Effect   = "Allow"
        Action   = "kms:Decrypt"
        Resource = "arn:${data.aws_partition.current.partition}:kms:${var.region}:${data.aws_caller_identity.current.account_id}:key/*"
        Condition = {
          StringEquals = {
            "kms:ViaService"                      = "ssm.${var.region}.${data.aws_partition.current.dns_suffix}"
            "kms:EncryptionContext:PARAMETER_ARN" = aws_ssm_parameter.auth_token.arn
          }
        }
      },
    ]
  })
}
