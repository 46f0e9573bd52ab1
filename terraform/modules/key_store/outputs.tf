output "url" {
  description = "s3://<bucket>/<key> of the hashed keys object: the gateways' keys_s3.url and `python -m app.keys --store`."
  value       = "s3://${aws_s3_bucket.this.id}/${var.object_key}"
}

output "bucket_name" {
  description = "Name of the key store bucket."
  value       = aws_s3_bucket.this.id
}

output "object_arn" {
  description = "ARN of the keys object: the only object the hosts may read."
  value       = local.object_arn
}

output "kms_key_arn" {
  description = "ARN of the KMS key the key set is encrypted with; operators who change keys need kms:Decrypt and kms:GenerateDataKey on it (an account administrator has them)."
  value       = aws_kms_key.this.arn
}

output "s3_cidrs" {
  description = "Address ranges of S3 in the region (its AWS-managed prefix list): the gateway unit, which may reach nothing but loopback otherwise, is allowed these to read the key set."
  value       = sort([for e in data.aws_ec2_managed_prefix_list.s3.entries : e.cidr])
}

output "host_read_policy" {
  description = "The policy document attached to the hosts' role (for review and tests)."
  value       = aws_iam_role_policy.read.policy
}
